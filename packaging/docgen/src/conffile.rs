//! The commented conffile the package installs (`packaging/debian/meshd.toml`, as
//! `/etc/meshd/meshd.toml`) and the `meshd.toml(5)` man page, both rendered from
//! `mesh_proto::config::KNOWN_KEYS`, so they cannot drift from each other or from the parser
//! (its tests hold KNOWN_KEYS to it). A test here checks that `packaging/debian/meshd.toml` is
//! [`conffile`]'s text; `MESHD_UPDATE_CONFFILE=1 cargo test -p meshd-docgen` rewrites it.

use mesh_proto::config::keys::keys_of;
use mesh_proto::config::{KeyDefault, KnownKey, KnownTable, KNOWN_TABLES};

use crate::text_line;

/// Width of the conffile's comment lines.
const WIDTH: usize = 96;

/// The conffile's opening comment.
const HEADER: &str = "\
/etc/meshd/meshd.toml: meshd's configuration (installed by the meshd package).

As shipped, every setting is commented out and meshd forms no mesh: it has no address, no \
peers and no coordinator, and waits for an invitation token. Pick one of:

  1. Join a mesh (the usual case). On the coordinator: `meshctl invite NAME`; here:
       meshctl join -          (then paste the token; or: meshctl join --token-file F)
     The token brings this host's name, its address and the way to the coordinator; the
     netmap brings the peers. Nothing else is needed in this file. For unattended installs,
     put the token in a file (owned by root, mode 0600; removed after the join) and set
     daemon.join_token_file below instead.
  2. Run the coordinator: fill in [host] and [coordinator] below, then
       systemctl restart meshd
  3. Static peers only (no coordinator): fill in [host] and one [[peer]] per peer, then
       systemctl restart meshd

`meshd --check-config` validates this file; `meshctl reload` (or SIGHUP) re-reads it. Unknown \
keys are refused, naming the key and this file. Below, every key with its meaning and default \
(`#key = value` lines are settings to uncomment); man meshd.toml has the same text. Examples \
for a whole fleet: /usr/share/doc/meshd/examples/.

Integrations write files outside /etc/meshd; the systemd unit allows the default paths (see \
`systemctl cat meshd`). Add a path with `systemctl edit meshd` (ReadWritePaths=).";

/// `[name]` or `[[name]]`.
fn header(t: &KnownTable) -> String {
    if t.array {
        format!("[[{}]]", t.name)
    } else {
        format!("[{}]", t.name)
    }
}

/// The sentences after a key's meaning: when it is required, its default.
fn notes(k: &KnownKey) -> String {
    let mut s = String::new();
    match k.required {
        Some("always") => s.push_str(" Required."),
        Some(when) => s.push_str(&format!(" Required {when}.")),
        None => {}
    }
    match k.default {
        KeyDefault::Value(v) => s.push_str(&format!(" Default: {v}.")),
        KeyDefault::Words(w) => s.push_str(&format!(" Default: {w}.")),
        KeyDefault::None => {}
    }
    s
}

/// The key as written in the file (a table keyed by names shows an example name).
fn key_name(k: &KnownKey) -> &'static str {
    if k.key == "NAME" {
        "dock-prod"
    } else {
        k.key
    }
}

/// Keys written as a table of their own (`static_assignments`) are shown there instead.
fn in_file(k: &&KnownKey) -> bool {
    k.kind != "table"
}

/// `text` as `# ` comment lines of at most [`WIDTH`] columns (paragraph breaks kept; lines
/// starting with spaces kept as they are).
fn comment(text: &str) -> String {
    let mut out = String::new();
    for para in text.split('\n') {
        if para.is_empty() {
            out.push_str("#\n");
            continue;
        }
        if para.starts_with(' ') {
            out.push_str(&format!("# {para}\n"));
            continue;
        }
        let mut line = String::from("#");
        for word in para.split_whitespace() {
            if line.len() + 1 + word.len() > WIDTH && line.len() > 1 {
                out.push_str(&line);
                out.push('\n');
                line = String::from("#");
            }
            line.push(' ');
            line.push_str(word);
        }
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// The conffile: [`HEADER`], then every table and key of KNOWN_KEYS, commented out, each key
/// after its meaning, required-ness and default.
pub fn conffile() -> String {
    let mut out = comment(HEADER);
    for t in KNOWN_TABLES {
        out.push('\n');
        out.push_str(&format!("#{}\n", header(t)));
        out.push_str(&comment(t.meaning));
        out.push_str("#\n");
        for k in keys_of(t.name).filter(in_file) {
            out.push_str(&comment(&format!("{}{}", k.meaning, notes(k))));
            out.push_str(&format!("#{} = {}\n", key_name(k), k.example));
        }
    }
    out
}

/// `meshd.toml(5)` for meshd `version`.
/// `docs/CONFIGURATION.md`: every table and key (type, default, when required, meaning) as
/// Markdown, from the same source as the conffile and meshd.toml(5).
pub fn reference_markdown() -> String {
    let mut s = String::from(
        "# Configuration reference\n\n\
         Every table and key of `/etc/meshd/meshd.toml`. Generated from \
         `mesh_proto::config::KNOWN_KEYS`, the source of the packaged conffile and of \
         `meshd.toml(5)`, whose tests hold it to the parser; rewrite this file with \
         `MESHD_UPDATE_CONFFILE=1 cargo test -p meshd-docgen`. `meshd --check-config` checks a \
         file against it.\n",
    );
    for t in KNOWN_TABLES {
        s.push_str(&format!("\n## `{}`\n\n{}\n\n", header(t), t.meaning));
        s.push_str("| key | type | default | meaning |\n|---|---|---|---|\n");
        for k in keys_of(t.name) {
            let default = match k.default {
                KeyDefault::Value(v) => format!("`{v}`"),
                KeyDefault::Words(w) => w.to_owned(),
                KeyDefault::None => match k.required {
                    Some("always") => "required".to_owned(),
                    Some(when) => format!("required {when}"),
                    None => "none".to_owned(),
                },
            };
            let cell = |text: &str| text.replace('|', "\\|").replace('\n', " ");
            s.push_str(&format!(
                "| `{}` | {} | {} | {} |\n",
                k.key,
                cell(k.kind),
                cell(&default),
                cell(k.meaning)
            ));
        }
    }
    s
}

pub fn man_page(version: &str) -> String {
    let mut out = String::new();
    out.push_str(
        ".\\\" meshd.toml(5): generated by meshd-docgen (packaging/docgen/src/conffile.rs) from\n\
         .\\\" mesh_proto::config::KNOWN_KEYS, as the commented /etc/meshd/meshd.toml is.\n",
    );
    out.push_str(&format!(
        ".TH MESHD.TOML 5 \"\" \"meshd {version}\" \"File Formats\"\n"
    ));
    out.push_str(
        ".SH NAME\n\
         meshd.toml \\- configuration file of meshd, the WireGuard mesh daemon\n\
         .SH SYNOPSIS\n\
         .I /etc/meshd/meshd.toml\n\
         .SH DESCRIPTION\n\
         .BR meshd (8)\n\
         reads its configuration from\n\
         .I /etc/meshd/meshd.toml\n\
         (another file with\n\
         .B \\-\\-config\n\
         or\n\
         .BR MESHD_CONFIG ).\n\
         The file is TOML.\n\
         Every table and key is optional unless said otherwise below; an absent key has its\n\
         default.\n\
         Unknown keys and invalid values are refused: every error of the file is reported at\n\
         once, as FILE:LINE:COL: KEY: message.\n\
         .PP\n\
         A host that joins a mesh with an invitation token\n\
         .RB ( \"meshctl join \\-\" )\n\
         needs nothing in this file: the token brings its name, its address and the way to the\n\
         coordinator, and the netmap brings the peers.\n\
         The coordinator host needs\n\
         .B [host]\n\
         and\n\
         .BR [coordinator] ;\n\
         a mesh of static peers needs\n\
         .B [host]\n\
         and one\n\
         .B [[peer]]\n\
         per peer.\n\
         .PP\n\
         .B meshd \\-\\-check\\-config\n\
         validates the file.\n\
         .B meshctl reload\n\
         or SIGHUP re-reads it; a file that does not validate is refused and the previous\n\
         configuration stays in force.\n\
         A change of\n\
         .B host.interface\n\
         or\n\
         .B daemon.control_socket\n\
         is refused too: it needs a restart of meshd.\n\
         .SH KEYS\n",
    );
    for t in KNOWN_TABLES {
        out.push_str(&format!(".SS \"{}\"\n", header(t)));
        out.push_str(&text_line(t.meaning));
        out.push('\n');
        for k in keys_of(t.name) {
            out.push_str(".TP\n");
            let name = if k.key == "NAME" {
                "\\fINAME\\fR".to_string()
            } else {
                format!("\\fB{}\\fR", text_line(k.key))
            };
            out.push_str(&format!("{name} = \\fI{}\\fR\n", text_line(k.kind)));
            out.push_str(&text_line(&format!("{}{}", k.meaning, notes(k))));
            out.push('\n');
            if k.default != KeyDefault::Value(k.example) {
                out.push_str(".br\n");
                out.push_str(&text_line(&format!(
                    "Example: {} = {}",
                    key_name(k),
                    k.example
                )));
                out.push('\n');
            }
        }
    }
    out.push_str(
        ".SH FILES\n\
         .TP\n\
         .I /etc/meshd/meshd.toml\n\
         The configuration; as installed, every setting in it is commented out, with its\n\
         meaning and default.\n\
         .TP\n\
         .I /usr/share/doc/meshd/examples/\n\
         The configurations of a whole example fleet (a coordinator, its members, a K3s\n\
         cluster, DRBD), every key in use.\n\
         .SH EXAMPLES\n\
         The coordinator of a mesh:\n\
         .PP\n\
         .RS 4\n\
         .EX\n\
         [host]\n\
         name = \"dock\\-load\"\n\
         address = \"10.99.99.1/24\"\n\
         \n\
         [coordinator]\n\
         mesh_cidr = \"10.99.99.0/24\"\n\
         public_endpoints = [\"198.51.100.1:51871\"]\n\
         .EE\n\
         .RE\n\
         .PP\n\
         Two hosts without a coordinator, on the first:\n\
         .PP\n\
         .RS 4\n\
         .EX\n\
         [host]\n\
         name = \"dock\\-load\"\n\
         address = \"10.99.99.1/24\"\n\
         \n\
         [[peer]]\n\
         name = \"dock\\-prod\"\n\
         public_key = \"AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=\"\n\
         endpoint = \"198.51.100.2:51871\"\n\
         allowed_ips = [\"10.99.99.2/32\"]\n\
         .EE\n\
         .RE\n\
         .SH SEE ALSO\n\
         .BR meshd (8),\n\
         .BR meshctl (8),\n\
         .BR meshd\\-wg (8),\n\
         .BR wg (8)\n",
    );
    out
}

/// The file name of [`man_page`] and its text, for `meshd --generate-docs`.
pub fn man_page_file(version: &str) -> crate::ExtraPage {
    ("meshd.toml.5".to_string(), man_page(version))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo_conffile() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../debian/meshd.toml")
    }

    #[test]
    fn the_packaged_conffile_is_the_rendered_one() {
        holds_the_rendered_text(&repo_conffile(), &conffile());
    }

    /// `path` holds `want`; `MESHD_UPDATE_CONFFILE=1` rewrites it first.
    fn holds_the_rendered_text(path: &std::path::Path, want: &str) {
        if std::env::var_os("MESHD_UPDATE_CONFFILE").is_some() {
            std::fs::write(path, want).expect("writing the rendered file");
        }
        let have = std::fs::read_to_string(path).expect("reading the rendered file");
        assert!(
            have == want,
            "{} is not what KNOWN_KEYS renders; edit mesh_proto::config::keys (or \
             packaging/docgen/src/conffile.rs), then rewrite the file with \
             MESHD_UPDATE_CONFFILE=1 cargo test -p meshd-docgen",
            path.display()
        );
    }

    #[test]
    fn the_configuration_reference_is_the_rendered_one() {
        let want = reference_markdown();
        holds_the_rendered_text(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/CONFIGURATION.md"),
            &want,
        );
        // Every key is in it.
        for k in mesh_proto::config::KNOWN_KEYS {
            assert!(
                want.contains(&format!("| `{}` |", k.key)),
                "{}.{}",
                k.table,
                k.key
            );
        }
    }

    #[test]
    fn the_conffile_as_shipped_is_the_defaults() {
        let shipped = mesh_proto::config::parse(&conffile(), "meshd.toml").expect("parses");
        let empty = mesh_proto::config::parse("", "meshd.toml").expect("parses");
        assert_eq!(shipped, empty);
    }

    #[test]
    fn the_conffile_with_every_setting_uncommented_is_valid() {
        let text: String = conffile()
            .lines()
            .map(|l| match l.strip_prefix('#') {
                Some(rest) if rest.starts_with(|c: char| c.is_ascii_lowercase() || c == '[') => {
                    rest.to_string()
                }
                _ => l.to_string(),
            })
            .map(|l| l + "\n")
            .collect();
        let config = mesh_proto::config::parse(&text, "meshd.toml")
            .unwrap_or_else(|e| panic!("{e}\n{text}"));
        // Every table really is in it.
        assert!(config.coordinator.is_some(), "{text}");
        assert_eq!(config.peers.len(), 1, "{text}");
        assert!(config.integrations.k3s.is_some() && !config.integrations.drbd.is_empty());
        for t in KNOWN_TABLES {
            assert!(text.contains(&format!("\n{}\n", header(t))), "{}", t.name);
        }
    }

    #[test]
    fn comments_fit_the_width() {
        for l in conffile().lines().filter(|l| l.starts_with("# ")) {
            assert!(l.len() <= WIDTH, "{l}");
        }
    }

    #[test]
    fn the_man_page_documents_every_key_and_renders_without_warnings() {
        let page = man_page("1.2.3");
        for k in mesh_proto::config::KNOWN_KEYS
            .iter()
            .filter(|k| k.key != "NAME")
        {
            assert!(
                page.contains(&format!("\\fB{}\\fR = ", text_line(k.key))),
                "{}.{} missing",
                k.table,
                k.key
            );
        }
        let warnings = crate::groff_warnings(&page).expect("groff runs");
        assert!(warnings.is_empty(), "{warnings}");
    }
}
