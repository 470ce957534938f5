//! Our nftables table, `table inet <routes.nft_table>` (default `meshd`), through the `nft`
//! binary. The table is replaced atomically in one `nft -f -` transaction (create if absent,
//! delete, define again); no other table or chain is ever named, flushed or changed, and
//! nothing goes to iptables. The content is mesh-proto's (`Firewall::render`).

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use mesh_proto::routes::Firewall;

use crate::error::{CommandError, Error, Result};

/// The `nft` binary: `MESHD_NFT` if set, else the first of PATH, /usr/sbin, /sbin.
pub fn nft_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("MESHD_NFT") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join("nft"))
        .find(|p| p.is_file())
}

/// Run `nft` (off the async workers, see crate::runtime::blocking). `what` names the job for
/// the error; a refusal is [`CommandError::Failed`] with nft's stderr.
fn nft(args: &[&str], stdin: Option<&str>, what: &str) -> Result<String> {
    crate::runtime::blocking::run(|| nft_now(args, stdin, what))
}

fn nft_now(args: &[&str], stdin: Option<&str>, what: &str) -> Result<String> {
    let bin = nft_binary().ok_or(Error::NotInstalled {
        program: "nft (nftables)",
        needed_for: "routes.advertise",
    })?;
    let command = format!("nft {} ({what})", args.join(" "));
    let mut child = match Command::new(&bin)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(source) => return Err(CommandError::Start { command, source }.into()),
    };
    if let (Some(text), Some(mut input)) = (stdin, child.stdin.take()) {
        if let Err(source) = input.write_all(text.as_bytes()) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(CommandError::Wait { command, source }.into());
        }
    }
    let out = match child.wait_with_output() {
        Ok(out) => out,
        Err(source) => return Err(CommandError::Wait { command, source }.into()),
    };
    Ok(CommandError::stdout_of(command, out)?)
}

/// `nft list table inet <table>`; `None` when the table does not exist.
pub fn list_table(table: &str) -> Result<Option<String>> {
    let what = format!("list table inet {table}");
    match nft(&["list", "table", "inet", table], None, &what) {
        Ok(listing) => Ok(Some(listing)),
        // nft refuses to list a table that does not exist.
        Err(Error::Command(CommandError::Failed { .. })) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Replace our table atomically with `fw` (one `nft -f -` transaction), or remove it when
/// `fw` is empty.
pub fn apply_firewall(fw: &Firewall) -> Result<()> {
    let text = with_fingerprint(fw);
    let what = format!("replace our table inet {}", fw.table);
    nft(&["-f", "-"], Some(&text), &what).map(|_| ())
}

fn with_fingerprint(fw: &Firewall) -> String {
    let text = fw.render();
    if fw.is_empty() {
        return text;
    }
    let head = format!("table inet {} {{\n", fw.table);
    text.replacen(
        &head,
        &format!("{head}\tcomment \"{}\"\n", fw.fingerprint()),
        1,
    )
}

/// The firewall as last applied or adopted, to notice drift (someone edited or deleted it).
#[derive(Debug, Clone, Default)]
pub struct FirewallState {
    /// What we want and the `nft list table` output right after we put it in place;
    /// `None` for an absent table.
    pub applied: Option<(Firewall, Option<String>)>,
}

impl FirewallState {
    /// Converge our table to `fw`. Without `nft` and with nothing to put in the table, does
    /// nothing. Returns the changes made.
    pub fn converge(&mut self, fw: &Firewall) -> Result<Vec<String>> {
        if fw.is_empty() && nft_binary().is_none() {
            self.applied = Some((fw.clone(), None));
            return Ok(Vec::new());
        }
        if let Some((held, listing)) = &self.applied {
            if held == fw && fw.is_empty() {
                return Ok(Vec::new());
            }
            if held == fw && list_table(&fw.table)? == *listing {
                return Ok(Vec::new());
            }
        }
        let now = list_table(&fw.table)?;
        if fw.is_empty() {
            if now.is_none() {
                self.applied = Some((fw.clone(), None));
                return Ok(Vec::new());
            }
            apply_firewall(fw)?;
            self.applied = Some((fw.clone(), None));
            return Ok(vec![format!("removed table inet {}", fw.table)]);
        }
        // A restarted daemon adopts its own identical table instead of rewriting it.
        let mark = format!("comment \"{}\"", fw.fingerprint());
        if self.applied.is_none() && now.as_deref().is_some_and(|t| t.contains(&mark)) {
            self.applied = Some((fw.clone(), now));
            return Ok(Vec::new());
        }
        apply_firewall(fw)?;
        let listing = list_table(&fw.table)?;
        self.applied = Some((fw.clone(), listing));
        Ok(vec![format!(
            "replaced table inet {} (advertise {})",
            fw.table,
            fw.advertise
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )])
    }
}

/// Remove our table if it exists (and `nft` is installed). Returns whether it did.
pub fn remove(table: &str) -> Result<bool> {
    if nft_binary().is_none() || list_table(table)?.is_none() {
        return Ok(false);
    }
    let what = format!("remove our table inet {table}");
    nft(&["-f", "-"], Some(&Firewall::render_removal(table)), &what)?;
    Ok(true)
}
