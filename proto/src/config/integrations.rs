//! The `[integrations]` part of meshd's configuration: which files meshd writes for K3s, DRBD,
//! Prometheus, `/etc/hosts` and user templates, where, and what it runs when they change.
//! Pure: [`parse_integrations`] takes the `integrations` TOML value (the caller's config parser
//! hands it over) and validates it; errors name the key (`integrations.drbd[1].hosts`).
//!
//! ```toml
//! [integrations.k3s]                  # optional
//! role = "server"                     # "server", or "agent" with `server`
//! # server = "dock-load"              # agents: the K3s server's mesh name (implies role agent)
//! path = "/etc/rancher/k3s/config.yaml.d/90-meshd.yaml"   # default; never config.yaml
//! flannel_iface = "wgmesh0"           # default: the mesh interface
//! check = ["..."]                     # optional argv run after writing, before reload
//! reload = ["systemctl", "restart", "k3s"]  # optional argv run when the file changed
//!
//! [[integrations.drbd]]               # one per resource
//! resource = "r0"                     # [A-Za-z0-9_-]+
//! hosts = ["dock-prod", "dock-mirror"] # mesh names; node-id = position in this list
//! port = 7788                         # default 7788 + the entry's index
//! path = "/etc/drbd.d/r0.res"         # default /etc/drbd.d/RESOURCE.res
//! device = "/dev/drbd0"               # default /dev/drbdMINOR
//! minor = 0                           # default the entry's index
//! disk = "/dev/vg0/r0"                # required unless `template` is given
//! meta_disk = "internal"              # default internal
//! template = "/etc/meshd/r0.res.j2"   # optional: a minijinja template instead of the built-in
//! drbdadm = "drbdadm"                 # default: check `drbdadm -d adjust RES`, reload
//!                                     # `drbdadm adjust RES` (override with check / reload)
//!
//! [integrations.prometheus]           # optional: file_sd JSON
//! path = "/etc/prometheus/file_sd/meshd.json"   # default
//! reload = []                         # Prometheus re-reads file_sd files by itself
//!
//! [integrations.hosts]                # optional: the `# BEGIN meshd` block
//! enable = true                       # default true when the table is present
//! path = "/etc/hosts"                 # default
//!
//! [[integrations.template]]           # user templates: minijinja, the MeshView as context
//! name = "haproxy"                    # default: the path; shows in status and doctor
//! source = "/etc/meshd/haproxy.cfg.j2"
//! path = "/etc/haproxy/conf.d/mesh.cfg"
//! check = ["haproxy", "-c", "-f", "/etc/haproxy/haproxy.cfg"]
//! reload = ["systemctl", "reload", "haproxy"]
//! ```

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::handoff::K3sRole;

/// Where K3s reads meshd's drop-in (after config.yaml, so ours wins for scalars).
pub const DEFAULT_K3S_DROPIN: &str = "/etc/rancher/k3s/config.yaml.d/90-meshd.yaml";
/// The first DRBD port; entry N defaults to `DRBD_BASE_PORT + N`.
pub const DRBD_BASE_PORT: u16 = 7788;
/// Where DRBD resource files go by default (`/etc/drbd.d/RESOURCE.res`).
pub const DEFAULT_DRBD_DIR: &str = "/etc/drbd.d";
/// Default file_sd output.
pub const DEFAULT_PROMETHEUS_PATH: &str = "/etc/prometheus/file_sd/meshd.json";
/// Default hosts file.
pub const DEFAULT_HOSTS_PATH: &str = "/etc/hosts";

/// The validated `[integrations]` table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct IntegrationsConfig {
    pub k3s: Option<K3sIntegration>,
    pub drbd: Vec<DrbdIntegration>,
    pub prometheus: Option<FileIntegration>,
    pub hosts: Option<FileIntegration>,
    pub templates: Vec<TemplateIntegration>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct K3sIntegration {
    #[serde(serialize_with = "ser_role")]
    pub role: K3sRole,
    pub path: PathBuf,
    /// `None`: the mesh interface.
    pub flannel_iface: Option<String>,
    pub check: Option<Vec<String>>,
    pub reload: Option<Vec<String>>,
}

fn ser_role<S: serde::Serializer>(role: &K3sRole, s: S) -> Result<S::Ok, S::Error> {
    match role {
        K3sRole::Server => s.serialize_str("server"),
        K3sRole::Agent { server } => s.serialize_str(&format!("agent of {server}")),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DrbdIntegration {
    pub resource: String,
    /// Mesh names; a host's node-id is its position here (keep the order when adding hosts).
    pub hosts: Vec<String>,
    pub port: u16,
    pub path: PathBuf,
    pub device: String,
    pub disk: Option<String>,
    pub meta_disk: String,
    pub template: Option<PathBuf>,
    pub check: Option<Vec<String>>,
    pub reload: Option<Vec<String>>,
}

/// A built-in file with nothing to configure but where it goes and what runs after.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileIntegration {
    pub path: PathBuf,
    pub check: Option<Vec<String>>,
    pub reload: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TemplateIntegration {
    pub name: String,
    pub source: PathBuf,
    pub path: PathBuf,
    pub check: Option<Vec<String>>,
    pub reload: Option<Vec<String>>,
}

/// A refused `[integrations]` table: the key (`integrations.k3s.server`) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IntegrationsError {
    pub key: String,
    pub message: String,
}

impl fmt::Display for IntegrationsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

impl std::error::Error for IntegrationsError {}

fn err(key: impl Into<String>, message: impl Into<String>) -> IntegrationsError {
    IntegrationsError {
        key: key.into(),
        message: message.into(),
    }
}

// ---- raw format ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawK3s {
    role: Option<String>,
    server: Option<String>,
    path: Option<PathBuf>,
    flannel_iface: Option<String>,
    check: Option<Vec<String>>,
    reload: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDrbd {
    resource: String,
    hosts: Vec<String>,
    port: Option<u16>,
    path: Option<PathBuf>,
    device: Option<String>,
    minor: Option<u32>,
    disk: Option<String>,
    meta_disk: Option<String>,
    template: Option<PathBuf>,
    drbdadm: Option<String>,
    check: Option<Vec<String>>,
    reload: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    enable: Option<bool>,
    path: Option<PathBuf>,
    check: Option<Vec<String>>,
    reload: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTemplate {
    name: Option<String>,
    source: PathBuf,
    path: PathBuf,
    check: Option<Vec<String>>,
    reload: Option<Vec<String>>,
}

const SECTIONS: [&str; 5] = ["k3s", "drbd", "prometheus", "hosts", "template"];

fn section<T: serde::de::DeserializeOwned>(
    key: &str,
    value: &toml::Value,
) -> Result<T, IntegrationsError> {
    value
        .clone()
        .try_into()
        .map_err(|e: toml::de::Error| err(key, e.message().trim().to_owned()))
}

fn array<'v>(key: &str, value: &'v toml::Value) -> Result<&'v [toml::Value], IntegrationsError> {
    value
        .as_array()
        .map(Vec::as_slice)
        .ok_or_else(|| err(key, format!("expected an array of tables ([[{key}]])")))
}

/// Parse and validate the `integrations` table (`value` is what is under `[integrations]`).
pub fn parse_integrations(value: &toml::Value) -> Result<IntegrationsConfig, IntegrationsError> {
    let table = value
        .as_table()
        .ok_or_else(|| err("integrations", "expected a table"))?;
    for key in table.keys() {
        if !SECTIONS.contains(&key.as_str()) {
            return Err(err(
                format!("integrations.{key}"),
                format!(
                    "unknown integration; expected one of {}",
                    SECTIONS.join(", ")
                ),
            ));
        }
    }
    let mut out = IntegrationsConfig::default();
    let mut paths: BTreeSet<PathBuf> = BTreeSet::new();
    let mut claim = |key: &str, path: &Path| -> Result<(), IntegrationsError> {
        if !path.is_absolute() {
            return Err(err(
                key,
                format!("{} is not an absolute path", path.display()),
            ));
        }
        if !paths.insert(path.to_path_buf()) {
            return Err(err(
                key,
                format!("{} is written by another integration too", path.display()),
            ));
        }
        Ok(())
    };

    if let Some(v) = table.get("k3s") {
        let raw: RawK3s = section("integrations.k3s", v)?;
        let role = match (raw.role.as_deref(), raw.server) {
            (Some("server"), None) => K3sRole::Server,
            (Some("server"), Some(_)) => {
                return Err(err(
                    "integrations.k3s.server",
                    "only agents name a server; remove it or set role = \"agent\"",
                ))
            }
            (Some("agent") | None, Some(server)) => {
                check_name("integrations.k3s.server", &server)?;
                K3sRole::Agent { server }
            }
            (Some("agent") | None, None) => {
                return Err(err(
                    "integrations.k3s.server",
                    "an agent needs the mesh name of the K3s server (server = \"NAME\")",
                ))
            }
            (Some(other), _) => {
                return Err(err(
                    "integrations.k3s.role",
                    format!("{other:?}: expected \"server\" or \"agent\""),
                ))
            }
        };
        let path = raw
            .path
            .unwrap_or_else(|| PathBuf::from(DEFAULT_K3S_DROPIN));
        if path.file_name().is_some_and(|n| n == "config.yaml") {
            return Err(err(
                "integrations.k3s.path",
                "meshd never writes K3s's config.yaml; use a drop-in in config.yaml.d/",
            ));
        }
        claim("integrations.k3s.path", &path)?;
        check_argv("integrations.k3s.check", &raw.check)?;
        check_argv("integrations.k3s.reload", &raw.reload)?;
        out.k3s = Some(K3sIntegration {
            role,
            path,
            flannel_iface: raw.flannel_iface,
            check: raw.check,
            reload: raw.reload,
        });
    }

    if let Some(v) = table.get("drbd") {
        let mut resources = BTreeSet::new();
        for (i, item) in array("integrations.drbd", v)?.iter().enumerate() {
            let key = format!("integrations.drbd[{i}]");
            let raw: RawDrbd = section(&key, item)?;
            let idx = u16::try_from(i).unwrap_or(u16::MAX);
            if raw.resource.is_empty()
                || !raw
                    .resource
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                return Err(err(
                    format!("{key}.resource"),
                    format!("{:?}: use letters, digits, '_' and '-'", raw.resource),
                ));
            }
            if !resources.insert(raw.resource.clone()) {
                return Err(err(
                    format!("{key}.resource"),
                    format!("resource {:?} is configured twice", raw.resource),
                ));
            }
            if raw.hosts.len() < 2 {
                return Err(err(
                    format!("{key}.hosts"),
                    "a replicated resource needs at least two hosts",
                ));
            }
            if raw.hosts.len() > 32 {
                return Err(err(format!("{key}.hosts"), "DRBD allows at most 32 nodes"));
            }
            let mut seen = BTreeSet::new();
            for h in &raw.hosts {
                check_name(&format!("{key}.hosts"), h)?;
                if !seen.insert(h) {
                    return Err(err(
                        format!("{key}.hosts"),
                        format!("{h:?} is listed twice"),
                    ));
                }
            }
            let port = raw.port.unwrap_or(DRBD_BASE_PORT.saturating_add(idx));
            if port == 0 {
                return Err(err(format!("{key}.port"), "port 0 is not a port"));
            }
            if raw.disk.is_none() && raw.template.is_none() {
                return Err(err(
                    format!("{key}.disk"),
                    "the built-in resource template needs the backing disk (disk = \"/dev/...\", or \"none\" for a diskless node)",
                ));
            }
            let path = raw.path.unwrap_or_else(|| {
                Path::new(DEFAULT_DRBD_DIR).join(format!("{}.res", raw.resource))
            });
            claim(&format!("{key}.path"), &path)?;
            if let Some(t) = &raw.template {
                if !t.is_absolute() {
                    return Err(err(
                        format!("{key}.template"),
                        format!("{} is not an absolute path", t.display()),
                    ));
                }
            }
            let drbdadm = raw.drbdadm.unwrap_or_else(|| "drbdadm".to_owned());
            let check = raw.check.or_else(|| {
                Some(vec![
                    drbdadm.clone(),
                    "-d".into(),
                    "adjust".into(),
                    raw.resource.clone(),
                ])
            });
            let reload = raw
                .reload
                .or_else(|| Some(vec![drbdadm, "adjust".into(), raw.resource.clone()]));
            check_argv(&format!("{key}.check"), &check)?;
            check_argv(&format!("{key}.reload"), &reload)?;
            let minor = raw.minor.unwrap_or(u32::from(idx));
            out.drbd.push(DrbdIntegration {
                device: raw.device.unwrap_or_else(|| format!("/dev/drbd{minor}")),
                resource: raw.resource,
                hosts: raw.hosts,
                port,
                path,
                disk: raw.disk,
                meta_disk: raw.meta_disk.unwrap_or_else(|| "internal".to_owned()),
                template: raw.template,
                check,
                reload,
            });
        }
    }

    for (name, default) in [
        ("prometheus", DEFAULT_PROMETHEUS_PATH),
        ("hosts", DEFAULT_HOSTS_PATH),
    ] {
        let Some(v) = table.get(name) else { continue };
        let key = format!("integrations.{name}");
        let raw: RawFile = section(&key, v)?;
        if raw.enable == Some(false) {
            continue;
        }
        let path = raw.path.unwrap_or_else(|| PathBuf::from(default));
        claim(&format!("{key}.path"), &path)?;
        check_argv(&format!("{key}.check"), &raw.check)?;
        check_argv(&format!("{key}.reload"), &raw.reload)?;
        let file = FileIntegration {
            path,
            check: raw.check,
            reload: raw.reload,
        };
        if name == "prometheus" {
            out.prometheus = Some(file);
        } else {
            out.hosts = Some(file);
        }
    }

    if let Some(v) = table.get("template") {
        let mut names = BTreeSet::new();
        for (i, item) in array("integrations.template", v)?.iter().enumerate() {
            let key = format!("integrations.template[{i}]");
            let raw: RawTemplate = section(&key, item)?;
            if !raw.source.is_absolute() {
                return Err(err(
                    format!("{key}.source"),
                    format!("{} is not an absolute path", raw.source.display()),
                ));
            }
            claim(&format!("{key}.path"), &raw.path)?;
            check_argv(&format!("{key}.check"), &raw.check)?;
            check_argv(&format!("{key}.reload"), &raw.reload)?;
            let name = raw.name.unwrap_or_else(|| raw.path.display().to_string());
            if !names.insert(name.clone()) {
                return Err(err(
                    format!("{key}.name"),
                    format!("{name:?} is used twice"),
                ));
            }
            out.templates.push(TemplateIntegration {
                name,
                source: raw.source,
                path: raw.path,
                check: raw.check,
                reload: raw.reload,
            });
        }
    }
    Ok(out)
}

fn check_name(key: &str, name: &str) -> Result<(), IntegrationsError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && !name.starts_with('-')
        && !name.ends_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(err(key, format!("{name:?} is not a mesh host name")))
    }
}

fn check_argv(key: &str, argv: &Option<Vec<String>>) -> Result<(), IntegrationsError> {
    match argv {
        Some(a) if a.first().is_none_or(|p| p.is_empty()) && !a.is_empty() => {
            Err(err(key, "the command's program is empty"))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn parse(text: &str) -> Result<IntegrationsConfig, IntegrationsError> {
        let v: toml::Value = toml::from_str(text).unwrap();
        parse_integrations(v.get("integrations").unwrap())
    }

    #[test]
    fn full_example_parses_with_defaults() {
        let c = parse(
            r#"
            [integrations.k3s]
            server = "dock-load"
            [[integrations.drbd]]
            resource = "r0"
            hosts = ["dock-prod", "dock-mirror"]
            disk = "/dev/vg0/r0"
            [[integrations.drbd]]
            resource = "r1"
            hosts = ["dock-prod", "dock-mirror", "dock-load"]
            disk = "none"
            port = 7800
            [integrations.prometheus]
            [integrations.hosts]
            enable = true
            [[integrations.template]]
            source = "/etc/meshd/x.j2"
            path = "/etc/x.conf"
            reload = ["systemctl", "reload", "x"]
            "#,
        )
        .unwrap();
        let k3s = c.k3s.unwrap();
        assert_eq!(
            k3s.role,
            K3sRole::Agent {
                server: "dock-load".into()
            }
        );
        assert_eq!(k3s.path, Path::new(DEFAULT_K3S_DROPIN));
        assert_eq!(c.drbd[0].port, 7788);
        assert_eq!(c.drbd[1].port, 7800);
        assert_eq!(c.drbd[0].path, Path::new("/etc/drbd.d/r0.res"));
        assert_eq!(c.drbd[1].device, "/dev/drbd1");
        assert_eq!(
            c.drbd[0].check.as_deref().unwrap(),
            ["drbdadm", "-d", "adjust", "r0"]
        );
        assert_eq!(
            c.drbd[0].reload.as_deref().unwrap(),
            ["drbdadm", "adjust", "r0"]
        );
        assert_eq!(
            c.prometheus.unwrap().path,
            Path::new(DEFAULT_PROMETHEUS_PATH)
        );
        assert_eq!(c.hosts.unwrap().path, Path::new("/etc/hosts"));
        assert_eq!(c.templates[0].name, "/etc/x.conf");
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("[integrations.k3s]\nrole = \"boss\"", "integrations.k3s.role"),
            ("[integrations.k3s]\nrole = \"agent\"", "integrations.k3s.server"),
            (
                "[integrations.k3s]\nrole = \"server\"\npath = \"/etc/rancher/k3s/config.yaml\"",
                "integrations.k3s.path",
            ),
            ("[integrations.k3s]\nrole = \"server\"\nbogus = 1", "integrations.k3s"),
            ("[integrations.nope]\n", "integrations.nope"),
            (
                "[[integrations.drbd]]\nresource = \"r0\"\nhosts = [\"a\"]\ndisk = \"none\"",
                "integrations.drbd[0].hosts",
            ),
            (
                "[[integrations.drbd]]\nresource = \"r0\"\nhosts = [\"a\", \"b\"]",
                "integrations.drbd[0].disk",
            ),
            (
                "[[integrations.drbd]]\nresource = \"r 0\"\nhosts = [\"a\", \"b\"]\ndisk = \"none\"",
                "integrations.drbd[0].resource",
            ),
            (
                "[[integrations.drbd]]\nresource = \"r0\"\nhosts = [\"a\", \"B\"]\ndisk = \"none\"",
                "integrations.drbd[0].hosts",
            ),
            (
                "[integrations.prometheus]\npath = \"relative.json\"",
                "integrations.prometheus.path",
            ),
            (
                "[integrations.prometheus]\npath = \"/etc/hosts\"\n[integrations.hosts]",
                "integrations.hosts.path",
            ),
            (
                "[[integrations.template]]\nsource = \"/a.j2\"\npath = \"/a\"\nreload = [\"\"]",
                "integrations.template[0].reload",
            ),
            ("[integrations]\ntemplate = 3", "integrations.template"),
        ];
        for (text, key) in cases {
            let e = parse(text).expect_err(text);
            assert_eq!(e.key, key, "{text}: {e}");
        }
    }

    #[test]
    fn disabled_sections_are_off() {
        let c = parse("[integrations.hosts]\nenable = false").unwrap();
        assert_eq!(c.hosts, None);
        assert_eq!(
            parse("[integrations]").unwrap(),
            IntegrationsConfig::default()
        );
    }
}
