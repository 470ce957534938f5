//! The `[integrations]` part of meshd's configuration: which files meshd writes for K3s, DRBD,
//! Prometheus, `/etc/hosts` and user templates, where, and what it runs when they change.
//! Pure: the configuration parser hands its `integrations` table to [`read_integrations`],
//! which validates it; errors name the key (`integrations.drbd[1].hosts`) and its line.
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
//! hosts = ["dock-prod", "dock-mirror"] # mesh names; with 3+ hosts node-id = position here
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
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::error::ConfigErrors;
use crate::config::reader::{Reader, Tbl};
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
    /// Mesh names; with more than two hosts (DRBD 9) a host's node-id is its position here
    /// (keep the order when adding hosts).
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

impl IntegrationsConfig {
    /// Every command the integrations run, with the key it comes from
    /// (`integrations.k3s.reload`; a DRBD resource's default commands are its `check` and
    /// `reload` too).
    pub fn commands(&self) -> Vec<(String, &[String])> {
        let mut all: Vec<(String, &Option<Vec<String>>)> = Vec::new();
        if let Some(k) = &self.k3s {
            all.push(("integrations.k3s.check".into(), &k.check));
            all.push(("integrations.k3s.reload".into(), &k.reload));
        }
        for (i, d) in self.drbd.iter().enumerate() {
            all.push((format!("integrations.drbd[{i}].check"), &d.check));
            all.push((format!("integrations.drbd[{i}].reload"), &d.reload));
        }
        for (name, f) in [("prometheus", &self.prometheus), ("hosts", &self.hosts)] {
            if let Some(f) = f {
                all.push((format!("integrations.{name}.check"), &f.check));
                all.push((format!("integrations.{name}.reload"), &f.reload));
            }
        }
        for (i, t) in self.templates.iter().enumerate() {
            all.push((format!("integrations.template[{i}].check"), &t.check));
            all.push((format!("integrations.template[{i}].reload"), &t.reload));
        }
        all.into_iter()
            .filter_map(|(key, argv)| {
                let a = argv.as_deref()?;
                (!a.is_empty()).then_some((key, a))
            })
            .collect()
    }

    /// Every template file the integrations read, with its key: user templates' `source`,
    /// DRBD resources' `template`.
    pub fn template_sources(&self) -> Vec<(String, &Path)> {
        let mut out = Vec::new();
        for (i, d) in self.drbd.iter().enumerate() {
            if let Some(t) = &d.template {
                out.push((format!("integrations.drbd[{i}].template"), t.as_path()));
            }
        }
        for (i, t) in self.templates.iter().enumerate() {
            out.push((
                format!("integrations.template[{i}].source"),
                t.source.as_path(),
            ));
        }
        out
    }
}

const SECTIONS: [&str; 5] = ["k3s", "drbd", "prometheus", "hosts", "template"];

/// Parse the `[integrations]` table of a configuration document (other tables are ignored):
/// for tests and tools that want the integrations alone. `origin` names the file in errors.
pub fn parse_integrations(text: &str, origin: &str) -> Result<IntegrationsConfig, ConfigErrors> {
    let doc = Reader::document(origin, text)?;
    let mut r = Reader::new(origin, text);
    let root = r.root(&doc);
    let out = match r.table(&root, "integrations") {
        None => IntegrationsConfig::default(),
        Some(t) => read_integrations(&mut r, &t),
    };
    r.finish().map(|_| out)
}

/// Read and validate the `integrations` table `t`, every refusal recorded in `r`.
pub(crate) fn read_integrations(r: &mut Reader<'_>, t: &Tbl<'_>) -> IntegrationsConfig {
    r.known_keys(t, &SECTIONS);
    let mut out = IntegrationsConfig::default();
    let mut paths: BTreeSet<PathBuf> = BTreeSet::new();
    let mut claim = |r: &mut Reader<'_>, key: String, path: &Path| -> bool {
        if !path.is_absolute() {
            r.error(key, format!("{} is not an absolute path", path.display()));
            return false;
        }
        if !paths.insert(path.to_path_buf()) {
            r.error(
                key,
                format!("{} is written by another integration too", path.display()),
            );
            return false;
        }
        true
    };
    let argv = |r: &mut Reader<'_>, t: &Tbl<'_>, name: &str, example: &str| {
        let a = r.strings(t, name, example)?;
        if a.first().is_some_and(|p| p.is_empty()) {
            r.error(t.child(name), "the command's program is empty");
            return None;
        }
        Some(a)
    };

    if let Some(k) = r.table(t, "k3s") {
        r.known_keys(
            &k,
            &["role", "server", "path", "flannel_iface", "check", "reload"],
        );
        let role = r.string(&k, "role");
        let server = r.string(&k, "server");
        // A role or server of the wrong type has its own error already.
        let unread = (k.has("role") && role.is_none()) || (k.has("server") && server.is_none());
        let role = match (role.as_deref(), server) {
            _ if unread => None,
            (Some("server"), None) => Some(K3sRole::Server),
            (Some("server"), Some(_)) => {
                r.error(
                    k.child("server"),
                    "only agents name a server; remove it or set role = \"agent\"",
                );
                None
            }
            (Some("agent") | None, Some(server)) => {
                check_name(r, k.child("server"), &server).then_some(K3sRole::Agent { server })
            }
            (Some("agent") | None, None) => {
                r.error(
                    k.child("server"),
                    "an agent needs the mesh name of the K3s server (server = \"NAME\")",
                );
                None
            }
            (Some(other), _) => {
                r.error(
                    k.child("role"),
                    format!("{other:?} is not a role; use \"server\" or \"agent\""),
                );
                None
            }
        };
        let path = r
            .string(&k, "path")
            .map_or_else(|| PathBuf::from(DEFAULT_K3S_DROPIN), PathBuf::from);
        let path_ok = if path.file_name().is_some_and(|n| n == "config.yaml") {
            r.error(
                k.child("path"),
                "meshd never writes K3s's config.yaml; use a drop-in in config.yaml.d/",
            );
            false
        } else {
            claim(r, k.child("path"), &path)
        };
        let check = argv(r, &k, "check", "[\"k3s\", \"check-config\"]");
        let reload = argv(r, &k, "reload", "[\"systemctl\", \"restart\", \"k3s\"]");
        let flannel_iface = r.string(&k, "flannel_iface");
        if let (Some(role), true) = (role, path_ok) {
            out.k3s = Some(K3sIntegration {
                role,
                path,
                flannel_iface,
                check,
                reload,
            });
        }
    }

    let mut resources = BTreeSet::new();
    for (i, d) in r.tables(t, "drbd").into_iter().enumerate() {
        if let Some(d) = read_drbd(r, i, &d, &mut resources, &mut claim, &argv) {
            out.drbd.push(d);
        }
    }

    for (name, default) in [
        ("prometheus", DEFAULT_PROMETHEUS_PATH),
        ("hosts", DEFAULT_HOSTS_PATH),
    ] {
        let Some(f) = r.table(t, name) else { continue };
        r.known_keys(&f, &["enable", "path", "check", "reload"]);
        if r.bool(&f, "enable") == Some(false) {
            continue;
        }
        let path = r
            .string(&f, "path")
            .map_or_else(|| PathBuf::from(default), PathBuf::from);
        let ok = claim(r, f.child("path"), &path);
        let file = FileIntegration {
            path,
            check: argv(r, &f, "check", "[\"promtool\", \"check\", \"config\"]"),
            reload: argv(
                r,
                &f,
                "reload",
                "[\"systemctl\", \"reload\", \"prometheus\"]",
            ),
        };
        if !ok {
            continue;
        }
        if name == "prometheus" {
            out.prometheus = Some(file);
        } else {
            out.hosts = Some(file);
        }
    }

    let mut names = BTreeSet::new();
    for tt in r.tables(t, "template") {
        r.known_keys(&tt, &["name", "source", "path", "check", "reload"]);
        let source = r.string(&tt, "source").map(PathBuf::from);
        if !tt.has("source") {
            r.missing(
                &tt,
                "source",
                "a template needs its minijinja source file, e.g. source = \
                 \"/etc/meshd/haproxy.cfg.j2\"",
            );
        }
        if let Some(s) = source.as_ref().filter(|s| !s.is_absolute()) {
            r.error(
                tt.child("source"),
                format!("{} is not an absolute path", s.display()),
            );
        }
        let path = r.string(&tt, "path").map(PathBuf::from);
        if !tt.has("path") {
            r.missing(
                &tt,
                "path",
                "a template needs the file it writes, e.g. path = \"/etc/haproxy/conf.d/mesh.cfg\"",
            );
        }
        let path_ok = path.as_ref().is_some_and(|p| claim(r, tt.child("path"), p));
        let check = argv(
            r,
            &tt,
            "check",
            "[\"haproxy\", \"-c\", \"-f\", \"/etc/haproxy/haproxy.cfg\"]",
        );
        let reload = argv(r, &tt, "reload", "[\"systemctl\", \"reload\", \"haproxy\"]");
        let (Some(source), Some(path), true) = (source, path, path_ok) else {
            continue;
        };
        if !source.is_absolute() {
            continue;
        }
        let name = r
            .string(&tt, "name")
            .unwrap_or_else(|| path.display().to_string());
        if !names.insert(name.clone()) {
            r.error(tt.child("name"), format!("{name:?} is used twice"));
            continue;
        }
        out.templates.push(TemplateIntegration {
            name,
            source,
            path,
            check,
            reload,
        });
    }
    out
}

fn read_drbd(
    r: &mut Reader<'_>,
    i: usize,
    d: &Tbl<'_>,
    resources: &mut BTreeSet<String>,
    claim: &mut impl FnMut(&mut Reader<'_>, String, &Path) -> bool,
    argv: &impl Fn(&mut Reader<'_>, &Tbl<'_>, &str, &str) -> Option<Vec<String>>,
) -> Option<DrbdIntegration> {
    r.known_keys(
        d,
        &[
            "resource",
            "hosts",
            "port",
            "path",
            "device",
            "minor",
            "disk",
            "meta_disk",
            "template",
            "drbdadm",
            "check",
            "reload",
        ],
    );
    let idx = u16::try_from(i).unwrap_or(u16::MAX);
    let mut ok = true;
    if !d.has("resource") {
        r.missing(
            d,
            "resource",
            "name the DRBD resource, e.g. resource = \"r0\"",
        );
    }
    let resource = r.string(d, "resource");
    if let Some(res) = &resource {
        if res.is_empty()
            || !res
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            ok = false;
            r.error(
                d.child("resource"),
                format!("{res:?} is not a resource name: use letters, digits, '_' and '-'"),
            );
        } else if !resources.insert(res.clone()) {
            ok = false;
            r.error(
                d.child("resource"),
                format!("resource {res:?} is configured twice"),
            );
        }
    }
    if !d.has("hosts") {
        r.missing(
            d,
            "hosts",
            "list the mesh names of the resource's hosts, e.g. hosts = [\"dock-prod\", \
             \"dock-mirror\"]",
        );
    }
    let hosts = r.strings(d, "hosts", "[\"dock-prod\", \"dock-mirror\"]");
    if let Some(hosts) = &hosts {
        if hosts.len() < 2 {
            ok = false;
            r.error(
                d.child("hosts"),
                "a replicated resource needs at least two hosts",
            );
        }
        if hosts.len() > 32 {
            ok = false;
            r.error(d.child("hosts"), "DRBD allows at most 32 nodes");
        }
        let mut seen = BTreeSet::new();
        for (j, h) in hosts.iter().enumerate() {
            let key = format!("{}[{j}]", d.child("hosts"));
            if !check_name(r, key.clone(), h) {
                ok = false;
            } else if !seen.insert(h) {
                ok = false;
                r.error(key, format!("{h:?} is listed twice"));
            }
        }
    }
    let port = match d.has("port") {
        true => r.int(d, "port").and_then(|p| {
            let port = u16::try_from(p).ok().filter(|p| *p != 0);
            if port.is_none() {
                r.error(
                    d.child("port"),
                    format!("{p} is out of range; a port is 1 to 65535"),
                );
            }
            port
        }),
        false => Some(DRBD_BASE_PORT.saturating_add(idx)),
    };
    let minor = match d.has("minor") {
        true => r.int(d, "minor").and_then(|m| {
            let minor = u32::try_from(m).ok().filter(|m| *m <= MAX_MINOR);
            if minor.is_none() {
                r.error(
                    d.child("minor"),
                    format!("{m} is out of range; a device minor is 0 to {MAX_MINOR}"),
                );
            }
            minor
        }),
        false => Some(u32::from(idx)),
    };
    let disk = r.string(d, "disk");
    let template = r.string(d, "template").map(PathBuf::from);
    if !d.has("disk") && !d.has("template") {
        ok = false;
        r.missing(
            d,
            "disk",
            "the built-in resource template needs the backing disk (disk = \"/dev/...\", or \
             \"none\" for a diskless node)",
        );
    }
    if let Some(t) = template.as_ref().filter(|t| !t.is_absolute()) {
        ok = false;
        r.error(
            d.child("template"),
            format!("{} is not an absolute path", t.display()),
        );
    }
    let resource = resource?;
    let path = r.string(d, "path").map_or_else(
        || Path::new(DEFAULT_DRBD_DIR).join(format!("{resource}.res")),
        PathBuf::from,
    );
    ok &= claim(r, d.child("path"), &path);
    let drbdadm = r
        .string(d, "drbdadm")
        .unwrap_or_else(|| "drbdadm".to_owned());
    let check = match d.has("check") {
        true => argv(r, d, "check", "[\"drbdadm\", \"-d\", \"adjust\", \"r0\"]"),
        false => Some(vec![
            drbdadm.clone(),
            "-d".into(),
            "adjust".into(),
            resource.clone(),
        ]),
    };
    let reload = match d.has("reload") {
        true => argv(r, d, "reload", "[\"drbdadm\", \"adjust\", \"r0\"]"),
        false => Some(vec![drbdadm, "adjust".into(), resource.clone()]),
    };
    let device = r.string(d, "device");
    let meta_disk = r.string(d, "meta_disk");
    let minor = minor?;
    if !ok {
        return None;
    }
    Some(DrbdIntegration {
        device: device.unwrap_or_else(|| format!("/dev/drbd{minor}")),
        resource,
        hosts: hosts?,
        port: port?,
        path,
        disk,
        meta_disk: meta_disk.unwrap_or_else(|| "internal".to_owned()),
        template,
        check,
        reload,
    })
}

/// The largest device minor Linux has (20 bits).
const MAX_MINOR: u32 = (1 << 20) - 1;

fn check_name(r: &mut Reader<'_>, key: String, name: &str) -> bool {
    let ok = !name.is_empty()
        && name.len() <= 63
        && !name.starts_with('-')
        && !name.ends_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !ok {
        r.error(
            key,
            format!(
                "{name:?} is not a mesh host name (lowercase letters, digits and '-', at most 63)"
            ),
        );
    }
    ok
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn parse(text: &str) -> Result<IntegrationsConfig, ConfigErrors> {
        parse_integrations(text, "t.toml")
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
            (
                "[integrations.k3s]\nrole = \"server\"\nbogus = 1",
                "integrations.k3s.bogus",
            ),
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
                "integrations.drbd[0].hosts[1]",
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
            assert_eq!(e.first().key.as_deref(), Some(key), "{text}: {e}");
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
