//! A snapshot of what the lab must never change in the root namespace, to compare before,
//! during and after a run.

use std::process::{Command, Stdio};

use anyhow::{Context, Result};
use serde_json::Value;

use crate::lab::check_output;

/// Root-namespace network state and the files/sysctls a careless lab would touch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootSnapshot {
    /// `ip -j addr`, address lifetimes removed (they count down).
    pub addrs: Value,
    /// `ip -j route` (main table) and `ip -j -4 rule`.
    pub routes: Value,
    pub rules: Value,
    /// (ifindex, name) of every link.
    pub links: Vec<(u64, String)>,
    pub ip_forward: String,
    pub hostname: String,
    pub etc_hosts: String,
    /// Whether `/etc/meshd` and `/var/lib/meshd` exist in the root filesystem.
    pub meshd_dirs: (bool, bool),
}

fn ip_json(args: &[&str]) -> Result<Value> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running ip")?;
    let text = check_output(out, &format!("ip {}", args.join(" ")))?;
    if text.trim().is_empty() {
        return Ok(Value::Array(Vec::new()));
    }
    serde_json::from_str(&text).with_context(|| format!("parsing ip {}", args.join(" ")))
}

fn strip_lifetimes(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.remove("valid_life_time");
            m.remove("preferred_life_time");
            for (_, x) in m.iter_mut() {
                strip_lifetimes(x);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(strip_lifetimes),
        _ => {}
    }
}

impl RootSnapshot {
    /// Take a snapshot of the calling process's namespaces (the root ones, in the suites).
    pub fn take() -> Result<RootSnapshot> {
        let mut addrs = ip_json(&["-j", "addr"])?;
        strip_lifetimes(&mut addrs);
        let routes = ip_json(&["-j", "route"])?;
        let rules = ip_json(&["-j", "-4", "rule"])?;
        let links = ip_json(&["-j", "link"])?
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|l| {
                        Some((
                            l.get("ifindex")?.as_u64()?,
                            l.get("ifname")?.as_str()?.to_owned(),
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(RootSnapshot {
            addrs,
            routes,
            rules,
            links,
            ip_forward: std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")?
                .trim()
                .to_owned(),
            hostname: std::fs::read_to_string("/proc/sys/kernel/hostname")?
                .trim()
                .to_owned(),
            etc_hosts: std::fs::read_to_string("/etc/hosts").unwrap_or_default(),
            meshd_dirs: (
                std::path::Path::new("/etc/meshd").exists(),
                std::path::Path::new("/var/lib/meshd").exists(),
            ),
        })
    }

    /// Describe how `other` differs from `self` (empty if identical).
    pub fn diff(&self, other: &RootSnapshot) -> Vec<String> {
        let mut d = Vec::new();
        if self.addrs != other.addrs {
            d.push(format!(
                "ip addr changed:\n{}\n->\n{}",
                self.addrs, other.addrs
            ));
        }
        if self.routes != other.routes {
            d.push(format!(
                "ip route changed:\n{}\n->\n{}",
                self.routes, other.routes
            ));
        }
        if self.rules != other.rules {
            d.push(format!(
                "ip rule changed: {} -> {}",
                self.rules, other.rules
            ));
        }
        if self.links != other.links {
            d.push(format!(
                "links changed: {:?} -> {:?}",
                self.links, other.links
            ));
        }
        if self.ip_forward != other.ip_forward {
            d.push(format!(
                "ip_forward {} -> {}",
                self.ip_forward, other.ip_forward
            ));
        }
        if self.hostname != other.hostname {
            d.push(format!("hostname {} -> {}", self.hostname, other.hostname));
        }
        if self.etc_hosts != other.etc_hosts {
            d.push("/etc/hosts changed".into());
        }
        if self.meshd_dirs != other.meshd_dirs {
            d.push(format!(
                "/etc/meshd, /var/lib/meshd existence {:?} -> {:?}",
                self.meshd_dirs, other.meshd_dirs
            ));
        }
        d
    }
}
