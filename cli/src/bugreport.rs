//! `meshctl bugreport`: one archive an operator can attach to a bug report. What goes in
//! (each a file in the archive): meshd's status, peers and doctor report as JSON (through the
//! control socket, else the error), versions, the configuration, the state directory's
//! membership and netmap, the interface, routes, rules and meshd's nftables table, and the
//! last 2000 lines of meshd's journal. Every file passes through
//! [`mesh_proto::redact::redact`] with this host's private keys and join token (read from
//! their files) as the secrets, so neither they nor any invitation token are in the archive.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result};
use mesh_proto::wire::control::{Request, Response};

/// The files of the report: (name in the archive, content before redaction).
fn collect(socket: &Path, config: &Path) -> (Vec<(String, String)>, Vec<String>) {
    let mut files = Vec::new();
    let mut secrets = Vec::new();
    let via_socket = |req: Request| -> String {
        match crate::request(socket, &req) {
            Ok(Response::Error { message }) => format!("meshd answered with an error: {message}\n"),
            Ok(resp) => serde_json::to_string_pretty(&resp)
                .map(|t| t + "\n")
                .unwrap_or_else(|e| format!("cannot encode the answer: {e}\n")),
            Err(e) => format!("{e:#}\n"),
        }
    };
    files.push(("status.json".into(), via_socket(Request::Status)));
    files.push(("peers.json".into(), via_socket(Request::Peers)));
    files.push(("doctor.json".into(), via_socket(Request::Doctor)));
    files.push((
        "versions.txt".into(),
        format!(
            "meshctl {}\n{}{}",
            env!("CARGO_PKG_VERSION"),
            run(&crate::meshd_command().to_string_lossy(), &["--version"]),
            run("uname", &["-a"]),
        ),
    ));
    let text = std::fs::read_to_string(config)
        .unwrap_or_else(|e| format!("cannot read {}: {e}\n", config.display()));
    // The files that hold secrets, from the configuration (defaults where it does not parse).
    let parsed = mesh_proto::config::parse(&text, &config.display().to_string()).ok();
    let key_file = parsed
        .as_ref()
        .map(|c| c.host.private_key_file.clone())
        .unwrap_or_else(|| PathBuf::from("/etc/meshd/private.key"));
    let state_dir = parsed
        .as_ref()
        .map(|c| c.daemon.state_dir.clone())
        .unwrap_or_else(|| PathBuf::from("/var/lib/meshd"));
    let mut next = key_file.clone().into_os_string();
    next.push(".next");
    let mut secret_files = vec![key_file, PathBuf::from(next)];
    secret_files.extend(
        parsed
            .as_ref()
            .and_then(|c| c.daemon.join_token_file.clone()),
    );
    for f in &secret_files {
        if let Ok(s) = std::fs::read_to_string(f) {
            secrets.extend(s.lines().map(str::to_owned));
        }
    }
    files.push(("meshd.toml".into(), text));
    for name in ["membership.json", "netmap.json"] {
        let p = state_dir.join(name);
        let t = std::fs::read_to_string(&p)
            .unwrap_or_else(|e| format!("cannot read {}: {e}\n", p.display()));
        files.push((format!("state/{name}"), t));
    }
    let iface = parsed
        .as_ref()
        .map(|c| c.host.interface.clone())
        .unwrap_or_else(|| "wgmesh0".into());
    files.push((
        "network.txt".into(),
        [
            ("ip", vec!["-d", "link", "show", "dev", iface.as_str()]),
            ("ip", vec!["addr", "show", "dev", iface.as_str()]),
            ("ip", vec!["route", "show", "table", "all"]),
            ("ip", vec!["rule"]),
            ("nft", vec!["list", "table", "inet", "meshd"]),
        ]
        .into_iter()
        .map(|(prog, args)| format!("$ {prog} {}\n{}", args.join(" "), run(prog, &args)))
        .collect::<Vec<_>>()
        .join("\n"),
    ));
    files.push((
        "journal.txt".into(),
        run(
            "journalctl",
            &["-u", "meshd", "-n", "2000", "--no-pager", "-o", "short-iso"],
        ),
    ));
    (files, secrets)
}

/// A program's stdout, or why there is none (a missing program is no failure of the report).
fn run(prog: &str, args: &[&str]) -> String {
    match Command::new(prog).args(args).stdin(Stdio::null()).output() {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        Ok(o) => format!(
            "({prog} exited with {}: {})\n",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => format!("({prog} could not be run: {e})\n"),
    }
}

/// Write the report to `output` (default `meshd-bugreport-UNIXTIME.tar.gz` in the current
/// directory), mode 0600, and return its path.
pub fn write(socket: &Path, config: &Path, output: Option<&Path>) -> Result<PathBuf> {
    let (files, secrets) = collect(socket, config);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let path = output.map_or_else(
        || PathBuf::from(format!("meshd-bugreport-{now}.tar.gz")),
        Path::to_path_buf,
    );
    let file = {
        use std::os::unix::fs::OpenOptionsExt as _;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("cannot create {}", path.display()))?
    };
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    let dir = format!("meshd-bugreport-{now}");
    for (name, text) in &files {
        let text = mesh_proto::redact::redact(text, &secrets);
        let mut header = tar::Header::new_gnu();
        header.set_size(text.len() as u64);
        header.set_mode(0o600);
        header.set_mtime(now);
        header.set_cksum();
        tar.append_data(&mut header, format!("{dir}/{name}"), text.as_bytes())
            .with_context(|| format!("cannot write {name} into {}", path.display()))?;
    }
    tar.into_inner()
        .and_then(|gz| gz.finish())
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot finish {}", path.display()))?;
    Ok(path)
}
