//! meshd: the WireGuard mesh daemon.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser};
use meshd::runtime::startup::{check_config, doctor_offline, down_offline, serve};
use meshd::Settings;

#[derive(Debug, Parser)]
#[command(name = "meshd", version, about = "WireGuard mesh daemon")]
#[command(group(clap::ArgGroup::new("oneshot").args(["check_config", "doctor", "down"])))]
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
    /// With --check-config, --doctor or --down: print the result as JSON on stdout (the
    /// exit status is the same).
    #[arg(long, requires = "oneshot")]
    json: bool,
    /// Remove everything meshd owns on this host (interface, routes, nftables table,
    /// forwarding settings) with no daemon running (what `meshctl down` does through one).
    #[arg(long, conflicts_with = "check_config")]
    down: bool,
    /// Log level: error, warn, info, debug or trace (default: `RUST_LOG` if set, else
    /// `[daemon] log_level` of the configuration, else info). Under systemd meshd logs to
    /// journald with each line's priority.
    #[arg(long, value_parser = ["error", "warn", "info", "debug", "trace"])]
    log_level: Option<String>,
    /// How lines look on stderr when not under systemd: text, or json (one JSON object per
    /// line with timestamp, level, target, message and fields). Under systemd meshd logs to
    /// journald natively either way.
    #[arg(long, env = "MESHD_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

/// meshd(8) less what clap knows (see meshd_docgen::man_page).
const MAN_TEMPLATE: &str = include_str!("../../../packaging/man/meshd.8.in");

fn main() -> std::process::ExitCode {
    if let Some(dir) = meshd_docgen::requested() {
        let version = env!("CARGO_PKG_VERSION");
        return meshd_docgen::generate(
            Args::command(),
            MAN_TEMPLATE,
            &[meshd_docgen::conffile::man_page_file(version)],
            &dir,
        );
    }
    let args = Args::parse();
    let configured = configured_log_level(&args.config);
    init_logging(
        args.log_level.as_deref(),
        configured.as_str(),
        args.log_format == "json",
    );
    // Everything meshd creates is private unless it says otherwise (files other programs read
    // get their mode set explicitly): the state directory, the registry, its WAL. The packaged
    // unit sets UMask=0077 too; this covers meshd started any other way.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    match real_main(args) {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("meshd: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Logging. Under systemd (its `JOURNAL_STREAM` names our stderr) meshd logs to journald
/// natively: each line at its priority (error 3, warning 4, info 6, debug 7), its fields as
/// journal fields (`journalctl -u meshd INTERFACE=wgmesh0`, `PEER=...`), no timestamp of its
/// own and no colour. Elsewhere it writes lines to stderr, with colour codes only on a
/// terminal, or as JSON lines with `--log-format json`. The level: `--log-level` (error, warn,
/// info, debug, trace), else `RUST_LOG` (`tracing_subscriber`'s filter syntax, e.g.
/// `meshd=debug`), else `[daemon] log_level`, else `info`. netlink-packet-route
/// warns on every netlink dump on kernels newer than it knows (`IFLA_INET6_CONF` holding more
/// than it expects), which says nothing to an operator: it is filtered unless `RUST_LOG` names it.
/// `[daemon] log_level` of the configuration at `path`, `info` if it does not say or does not
/// parse (the real load reports why).
fn configured_log_level(path: &std::path::Path) -> mesh_proto::config::LogLevel {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| mesh_proto::config::parse(&text, &path.display().to_string()).ok())
        .map(|c| c.daemon.log_level)
        .unwrap_or_default()
}

fn init_logging(level: Option<&str>, configured: &str, json: bool) {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::EnvFilter;
    // An empty RUST_LOG (as an environment file may leave it) counts as unset.
    let rust_log = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty());
    let mut filter = match (level, &rust_log) {
        (Some(l), _) => EnvFilter::new(l),
        (None, Some(v)) => EnvFilter::try_new(v).unwrap_or_else(|_| EnvFilter::new(configured)),
        (None, None) => EnvFilter::new(configured),
    };
    let rust_log = rust_log.unwrap_or_default();
    if !rust_log.contains("netlink_packet_route") {
        if let Ok(quiet) = "netlink_packet_route=error".parse() {
            filter = filter.add_directive(quiet);
        }
    }
    if stderr_is_the_journal() {
        if let Ok(journald) = tracing_journald::layer() {
            let journald = journald
                .with_field_prefix(None)
                .with_syslog_identifier("meshd".to_owned())
                .with_priority_mappings(tracing_journald::PriorityMappings {
                    info: tracing_journald::Priority::Informational,
                    debug: tracing_journald::Priority::Debug,
                    ..tracing_journald::PriorityMappings::new()
                });
            tracing_subscriber::registry()
                .with(filter)
                .with(journald)
                .init();
            return;
        }
    }
    if json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
        return;
    }
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .init();
}

/// Whether stderr is the journal stream systemd connected (`JOURNAL_STREAM` is `DEV:INODE`
/// of it; a child whose stderr was redirected elsewhere inherits the variable, so the
/// numbers are compared).
fn stderr_is_the_journal() -> bool {
    let Ok(stream) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.split_once(':') else {
        return false;
    };
    match nix::sys::stat::fstat(std::io::stderr()) {
        Ok(st) => dev.parse() == Ok(st.st_dev) && ino.parse() == Ok(st.st_ino),
        Err(_) => false,
    }
}

/// `Ok(false)`: ran, but the outcome is a failure (a doctor check failed).
fn real_main(args: Args) -> Result<bool> {
    if args.check_config {
        let report = check_config(&args.config);
        if args.json {
            print_json(&report)?;
        } else {
            let (out, err) = report.render();
            eprint!("{err}");
            print!("{out}");
        }
        return Ok(report.valid);
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
        if args.json {
            print_json(&report)?;
        } else {
            print!("{}", report.render());
        }
        return Ok(!report.failed());
    }
    if args.down {
        let removed = runtime.block_on(down_offline(&settings))?;
        let message = if removed.is_empty() {
            "nothing to remove: meshd owns nothing on this host".to_string()
        } else {
            removed.join(", ")
        };
        if args.json {
            let done = mesh_proto::wire::control::Done::Down { removed };
            print_json(&mesh_proto::wire::control::Done::report(
                &message,
                Some(&done),
            ))?;
        } else {
            println!("{message}");
        }
        return Ok(true);
    }
    meshd::disk::state::StateDir::new(&settings.state_dir)
        .ensure_private()
        .context("preparing the state directory")?;
    runtime.block_on(serve(settings)).map(|()| true)
}

/// `value` as pretty JSON on stdout, with a final newline.
fn print_json<T: serde::Serialize>(value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value).context("cannot encode JSON")?;
    println!("{text}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_man_pages_render_without_warnings() {
        let page = meshd_docgen::man_page(Args::command(), MAN_TEMPLATE).expect("renders");
        for opt in Args::command().get_arguments().filter_map(|a| a.get_long()) {
            let escaped = format!("\\-\\-{}", opt.replace('-', "\\-"));
            assert!(page.contains(&escaped), "--{opt} missing");
        }
        let warnings = meshd_docgen::groff_warnings(&page).expect("groff runs");
        assert!(warnings.is_empty(), "meshd.8: {warnings}");
        let (_, conf) = meshd_docgen::conffile::man_page_file(env!("CARGO_PKG_VERSION"));
        let warnings = meshd_docgen::groff_warnings(&conf).expect("groff runs");
        assert!(warnings.is_empty(), "meshd.toml.5: {warnings}");
    }
}
