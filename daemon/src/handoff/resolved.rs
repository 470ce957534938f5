//! Split DNS with systemd-resolved: queries for `mesh.internal` go to mesh DNS on our
//! interface, nothing else does.
//!
//! `resolvectl dns IFACE ADDR`, `resolvectl domain IFACE '~mesh.internal'` and
//! `resolvectl default-route IFACE false`. resolved forgets them when it restarts or the
//! interface is recreated, so [`ensure_split_dns`] first reads the link's settings and only
//! sets what is missing: cheap enough to call on every agent pass. Hosts without resolvectl
//! are skipped with one log line (their `/etc/hosts` block or their own resolver config does
//! the job).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use mesh_proto::handoff::MESH_DOMAIN;

use crate::error::CommandError;

/// Runs `resolvectl ARGS...` and returns its stdout. Tests script the answers.
pub trait Resolvectl: Send + Sync {
    fn run(&self, args: &[&str]) -> Result<String, CommandError>;
}

/// The real `resolvectl`.
#[derive(Debug, Clone)]
pub struct SystemResolvectl {
    pub program: PathBuf,
}

impl SystemResolvectl {
    /// `resolvectl` from `PATH`, if installed.
    pub fn find() -> Option<SystemResolvectl> {
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path)
            .map(|d| d.join("resolvectl"))
            .find(|p| is_executable(p))
            .map(|program| SystemResolvectl { program })
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

impl Resolvectl for SystemResolvectl {
    fn run(&self, args: &[&str]) -> Result<String, CommandError> {
        let command = format!("resolvectl {}", args.join(" "));
        let out = match Command::new(&self.program)
            .args(args)
            .stdin(Stdio::null())
            .output()
        {
            Ok(out) => out,
            Err(source) => return Err(CommandError::Start { command, source }),
        };
        CommandError::stdout_of(command, out)
    }
}

/// What [`ensure_split_dns`] found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SplitDns {
    /// The link already had our server, domain and default-route off.
    AlreadySet,
    /// Some of it was missing (resolved restarted, first start): set now.
    Applied,
    /// No resolvectl on this host.
    Unavailable,
}

/// The routing domain we install on the interface.
pub fn routing_domain() -> String {
    format!("~{MESH_DOMAIN}")
}

/// The value part of `resolvectl dns|domain|default-route IFACE` output
/// (`Link 5 (wgmesh0): 10.99.99.1` → `10.99.99.1`).
fn link_value(output: &str) -> &str {
    let line = output.lines().next().unwrap_or("");
    match line.find("):") {
        Some(i) => line[i + 2..].trim(),
        None => line.trim(),
    }
}

/// Make resolved send `mesh.internal` (and only that) to `dns` over `iface`.
pub fn ensure_split_dns(
    resolvectl: &dyn Resolvectl,
    iface: &str,
    dns: IpAddr,
) -> Result<SplitDns, CommandError> {
    let dns_s = dns.to_string();
    let domain = routing_domain();
    let have_dns = resolvectl
        .run(&["dns", iface])
        .map(|o| link_value(&o).split_whitespace().any(|a| a == dns_s))
        .unwrap_or(false);
    let have_domain = resolvectl
        .run(&["domain", iface])
        .map(|o| link_value(&o).split_whitespace().any(|d| d == domain))
        .unwrap_or(false);
    let default_route_off = resolvectl
        .run(&["default-route", iface])
        .map(|o| link_value(&o) == "no")
        .unwrap_or(false);
    if have_dns && have_domain && default_route_off {
        return Ok(SplitDns::AlreadySet);
    }
    resolvectl.run(&["dns", iface, &dns_s])?;
    resolvectl.run(&["domain", iface, &domain])?;
    resolvectl.run(&["default-route", iface, "false"])?;
    tracing::info!(interface = iface, dns = %dns, domain = %domain, "split DNS set in systemd-resolved");
    Ok(SplitDns::Applied)
}

/// [`ensure_split_dns`] with the system's resolvectl; [`SplitDns::Unavailable`], with a log
/// line saying so, when there is none (call it once at start, then on every pass only while
/// it did not answer `Unavailable`).
pub fn ensure_split_dns_system(iface: &str, dns: IpAddr) -> Result<SplitDns, CommandError> {
    match SystemResolvectl::find() {
        Some(r) => ensure_split_dns(&r, iface, dns),
        None => {
            tracing::info!(
                interface = iface,
                "resolvectl not found: mesh.internal is not wired into the system resolver (use the /etc/hosts integration, or point your resolver at {dns} for {MESH_DOMAIN})"
            );
            Ok(SplitDns::Unavailable)
        }
    }
}

/// Undo it (`meshctl down`): `resolvectl revert IFACE`.
pub fn revert_split_dns(resolvectl: &dyn Resolvectl, iface: &str) -> Result<(), CommandError> {
    resolvectl.run(&["revert", iface]).map(|_| ())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::sync::Mutex;

    /// A resolved link: answers queries from its state, applies sets.
    #[derive(Default)]
    struct FakeResolved {
        dns: Mutex<Vec<String>>,
        domains: Mutex<Vec<String>>,
        default_route: Mutex<bool>,
        sets: Mutex<Vec<String>>,
    }

    impl Resolvectl for FakeResolved {
        fn run(&self, args: &[&str]) -> Result<String, CommandError> {
            let show = |v: String| Ok(format!("Link 5 ({}): {v}\n", args[1]));
            match args {
                ["dns", _] => show(self.dns.lock().unwrap().join(" ")),
                ["domain", _] => show(self.domains.lock().unwrap().join(" ")),
                ["default-route", _] => show(
                    if *self.default_route.lock().unwrap() {
                        "yes"
                    } else {
                        "no"
                    }
                    .into(),
                ),
                ["dns", _, a] => {
                    self.sets.lock().unwrap().push(args.join(" "));
                    *self.dns.lock().unwrap() = vec![(*a).into()];
                    Ok(String::new())
                }
                ["domain", _, d] => {
                    self.sets.lock().unwrap().push(args.join(" "));
                    *self.domains.lock().unwrap() = vec![(*d).into()];
                    Ok(String::new())
                }
                ["default-route", _, v] => {
                    self.sets.lock().unwrap().push(args.join(" "));
                    *self.default_route.lock().unwrap() = *v == "true";
                    Ok(String::new())
                }
                _ => Err(CommandError::exited(
                    format!("resolvectl {}", args.join(" ")),
                    1,
                    "unexpected by the test",
                )),
            }
        }
    }

    #[test]
    fn applies_once_and_again_after_a_restart() {
        let r = FakeResolved {
            default_route: Mutex::new(true),
            ..FakeResolved::default()
        };
        let dns: IpAddr = "10.99.99.1".parse().unwrap();
        assert_eq!(
            ensure_split_dns(&r, "wgmesh0", dns).ok(),
            Some(SplitDns::Applied)
        );
        assert_eq!(
            *r.sets.lock().unwrap(),
            [
                "dns wgmesh0 10.99.99.1",
                "domain wgmesh0 ~mesh.internal",
                "default-route wgmesh0 false"
            ]
        );
        r.sets.lock().unwrap().clear();
        assert_eq!(
            ensure_split_dns(&r, "wgmesh0", dns).ok(),
            Some(SplitDns::AlreadySet)
        );
        assert!(r.sets.lock().unwrap().is_empty());
        // resolved restarted: the link lost its settings.
        r.dns.lock().unwrap().clear();
        r.domains.lock().unwrap().clear();
        *r.default_route.lock().unwrap() = true;
        assert_eq!(
            ensure_split_dns(&r, "wgmesh0", dns).ok(),
            Some(SplitDns::Applied)
        );
        assert_eq!(r.sets.lock().unwrap().len(), 3);
    }

    #[test]
    fn parses_link_values() {
        assert_eq!(link_value("Link 5 (wgmesh0): 10.99.99.1\n"), "10.99.99.1");
        assert_eq!(link_value("Link 5 (wgmesh0):\n"), "");
        assert_eq!(link_value("no"), "no");
    }
}
