//! What `meshd --check-config` checks of the integrations without running anything: each
//! template source exists and compiles (and renders, when the configuration describes the mesh
//! statically), and each command's program exists and is executable. Every problem is a
//! [`ConfigError`] at the key it comes from, in the parser's `FILE:LINE:COL: KEY:` form.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use mesh_proto::config::{Config, ConfigError, SourceMap};
use mesh_proto::handoff::{check_template_syntax, render_template, MeshView};

/// Every problem found, in file order.
pub fn check(config: &Config, map: &SourceMap, search_path: Option<&str>) -> Vec<ConfigError> {
    let mut out = Vec::new();
    let integrations = &config.integrations;
    let view = MeshView::from_config(config);
    for (key, path) in integrations.template_sources() {
        let source = match std::fs::read_to_string(path) {
            Ok(s) => s,
            Err(e) => {
                out.push(map.error(
                    &key,
                    format!("cannot read the template {}: {e}", path.display()),
                ));
                continue;
            }
        };
        let name = path.display().to_string();
        // A user template renders with this host's static view when there is one; a DRBD
        // template also needs the resource's hosts in the mesh, so it is only compiled.
        let result = match (&view, key.starts_with("integrations.template")) {
            (Some(view), true) => {
                render_template(&name, &source, view, &config.host.interface).map(|_| ())
            }
            _ => check_template_syntax(&name, &source),
        };
        if let Err(e) = result {
            out.push(map.error(&key, e));
        }
    }
    for (key, argv) in integrations.commands() {
        if let Err(why) = find_program(&argv[0], search_path) {
            out.push(map.error(&key, why));
        }
    }
    out.sort_by_key(|e| {
        e.location
            .as_ref()
            .map_or((usize::MAX, usize::MAX), |l| (l.line, l.column))
    });
    out
}

/// Where `program` is (an absolute path as it is, a bare name on `search_path`, the
/// `PATH` meshd runs commands with), or why it cannot run.
pub fn find_program(program: &str, search_path: Option<&str>) -> Result<PathBuf, String> {
    if program.contains('/') {
        let path = Path::new(program);
        if !path.is_absolute() {
            return Err(format!(
                "`{program}` is a relative path; give the program's absolute path or a name \
                 on PATH"
            ));
        }
        return executable(path).map(|()| path.to_path_buf());
    }
    let dirs = search_path.unwrap_or_default();
    let mut refusal = None;
    for dir in std::env::split_paths(dirs) {
        let candidate = dir.join(program);
        if !candidate.exists() {
            continue;
        }
        match executable(&candidate) {
            Ok(()) => return Ok(candidate),
            Err(why) => refusal = refusal.or(Some(why)),
        }
    }
    Err(refusal.unwrap_or_else(|| {
        format!("`{program}` is not found on PATH ({dirs}); install it or give its absolute path")
    }))
}

fn executable(path: &Path) -> Result<(), String> {
    match std::fs::metadata(path) {
        Err(e) => Err(format!("{}: {e}", path.display())),
        Ok(m) if !m.is_file() => Err(format!("{} is not a file", path.display())),
        Ok(m) if m.permissions().mode() & 0o111 == 0 => {
            Err(format!("{} is not executable", path.display()))
        }
        Ok(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn parse(text: &str) -> (Config, SourceMap) {
        mesh_proto::config::parse_located(text, "meshd.toml").unwrap()
    }

    #[test]
    fn missing_programs_and_templates_are_errors_at_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        std::fs::write(dir.path().join("ok.j2"), "{{ me.name }}\n").unwrap();
        std::fs::write(dir.path().join("bad.j2"), "{% for %}\n").unwrap();
        std::fs::write(dir.path().join("noexec"), "").unwrap();
        let text = format!(
            "[host]\nname = \"dock-load\"\naddress = \"10.99.99.1/24\"\n\n\
             [integrations.k3s]\nrole = \"server\"\nreload = [\"no-such-program-here\", \"x\"]\n\n\
             [[integrations.template]]\nname = \"ok\"\nsource = \"{d}/ok.j2\"\npath = \"/t/ok\"\n\
             check = [\"sh\", \"-c\", \"true\"]\n\n\
             [[integrations.template]]\nname = \"bad\"\nsource = \"{d}/bad.j2\"\npath = \"/t/bad\"\n\
             reload = [\"{d}/noexec\"]\n\n\
             [[integrations.template]]\nname = \"gone\"\nsource = \"{d}/gone.j2\"\npath = \"/t/gone\"\n"
        );
        let (config, map) = parse(&text);
        let found = check(&config, &map, Some("/usr/bin:/bin"));
        let lines: Vec<String> = found.iter().map(ConfigError::one_line).collect();
        assert_eq!(lines.len(), 4, "{lines:#?}");
        assert!(lines[0].starts_with("meshd.toml:7:10: integrations.k3s.reload: `no-such-program-here` is not found on PATH (/usr/bin:/bin)"), "{}", lines[0]);
        assert!(
            lines[1].starts_with("meshd.toml:17:10: integrations.template[1].source: template "),
            "{}",
            lines[1]
        );
        assert!(
            lines[2].starts_with(&format!(
                "meshd.toml:19:10: integrations.template[1].reload: {d}/noexec is not executable"
            )),
            "{}",
            lines[2]
        );
        assert!(lines[3].starts_with(&format!("meshd.toml:23:10: integrations.template[2].source: cannot read the template {d}/gone.j2")), "{}", lines[3]);
    }

    #[test]
    fn drbd_default_commands_point_at_the_resource() {
        let text =
            "[[integrations.drbd]]\nresource = \"r0\"\nhosts = [\"a\", \"b\"]\ndisk = \"none\"\n";
        let (config, map) = parse(text);
        let found = check(&config, &map, Some(""));
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found[0]
            .one_line()
            .starts_with("meshd.toml:1:1: integrations.drbd[0].check: `drbdadm` is not found"));
    }
}
