//! Man pages and shell completions for meshd's programs.
//!
//! Each program's section 8 page is a hand-written template (`packaging/man/NAME.8.in`: NAME,
//! DESCRIPTION, FILES, SIGNALS, ENVIRONMENT, EXIT STATUS, EXAMPLES, SEE ALSO) into which
//! [`man_page`] fills the parts clap knows, so they cannot drift from what the binary parses:
//! `@SYNOPSIS@`, `@OPTIONS@` and `@COMMANDS@` (each alone on a line) and `@VERSION@`.
//! `meshd.toml(5)` and the commented conffile are rendered from
//! `mesh_proto::config::KNOWN_KEYS` ([`conffile`]). Completions come from clap_complete
//! ([`completion`]; `meshctl completion bash|zsh|fish` prints them too).
//!
//! `meshd --generate-docs DIR`, `meshctl --generate-docs DIR` and `meshd-wg --generate-docs
//! DIR` call [`generate`] with their own `clap::Command` and template (built into the binary),
//! and `packaging/build-deb.sh` packs the result. The option is deliberately not part of the
//! clap definitions: clap_complete offers hidden options and subcommands in the completions it
//! writes, so [`requested`] looks at the raw arguments instead (exactly `PROG --generate-docs
//! DIR`). Layout under `DIR`:
//!
//! ```text
//! man/NAME.8, man/meshd.toml.5            section 8 and 5 pages
//! bash/NAME                               /usr/share/bash-completion/completions/NAME
//! zsh/_NAME                               /usr/share/zsh/vendor-completions/_NAME
//! fish/NAME.fish                          /usr/share/fish/vendor_completions.d/NAME.fish
//! ```

pub mod conffile;

use std::io;
use std::path::{Path, PathBuf};

/// The option that asks a binary for its docs (see the module docs).
pub const OPTION: &str = "--generate-docs";

/// The shells `meshctl completion` and the package have completions for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

impl Shell {
    pub const ALL: [Shell; 3] = [Shell::Bash, Shell::Zsh, Shell::Fish];

    /// Where the package installs its completion for `name`, relative to the docs directory
    /// (`bash/NAME`, `zsh/_NAME`, `fish/NAME.fish`).
    pub fn file(self, name: &str) -> PathBuf {
        match self {
            Shell::Bash => Path::new("bash").join(name),
            Shell::Zsh => Path::new("zsh").join(format!("_{name}")),
            Shell::Fish => Path::new("fish").join(format!("{name}.fish")),
        }
    }

    fn generator(self) -> clap_complete::Shell {
        match self {
            Shell::Bash => clap_complete::Shell::Bash,
            Shell::Zsh => clap_complete::Shell::Zsh,
            Shell::Fish => clap_complete::Shell::Fish,
        }
    }
}

/// The completion script of `cmd` for `shell` (what `meshctl completion SHELL` prints and the
/// package installs).
pub fn completion(cmd: clap::Command, shell: Shell) -> Vec<u8> {
    let mut cmd = cmd;
    let name = cmd.get_name().to_owned();
    let mut text = Vec::new();
    clap_complete::generate(shell.generator(), &mut cmd, name, &mut text);
    text
}

/// `Some(DIR)` when this process was run as exactly `PROG --generate-docs DIR`.
pub fn requested() -> Option<PathBuf> {
    requested_in(std::env::args_os())
}

/// [`requested`] on given arguments (the program name first).
pub fn requested_in<I>(args: I) -> Option<PathBuf>
where
    I: IntoIterator,
    I::Item: Into<std::ffi::OsString>,
{
    let args: Vec<std::ffi::OsString> = args.into_iter().map(Into::into).collect();
    match args.as_slice() {
        [_, opt, dir] if opt == OPTION => Some(PathBuf::from(dir)),
        _ => None,
    }
}

/// A page besides the program's own: its file name (`meshd.toml.5`) and its text.
pub type ExtraPage = (String, String);

/// Write the docs for `cmd` under `dir` ([`write_docs`]) and say what was written on stderr;
/// the process' exit code.
pub fn generate(
    cmd: clap::Command,
    template: &str,
    extra: &[ExtraPage],
    dir: &Path,
) -> std::process::ExitCode {
    let name = cmd.get_name().to_owned();
    match write_docs(cmd, template, extra, dir) {
        Ok(files) => {
            for f in files {
                eprintln!("{name}: wrote {}", f.display());
            }
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{name}: cannot write the man pages and completions: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Write `cmd`'s section 8 page (from `template`, see [`man_page`]), the `extra` pages and its
/// bash, zsh and fish completions under `out` (see the module docs for the layout). Returns
/// the files written.
pub fn write_docs(
    cmd: clap::Command,
    template: &str,
    extra: &[ExtraPage],
    out: &Path,
) -> io::Result<Vec<PathBuf>> {
    let name = cmd.get_name().to_owned();
    let page = man_page(cmd.clone(), template)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{name}.8: {e}")))?;
    let mut files: Vec<(PathBuf, Vec<u8>)> = vec![(
        Path::new("man").join(format!("{name}.8")),
        page.into_bytes(),
    )];
    for (file, text) in extra {
        files.push((Path::new("man").join(file), text.clone().into_bytes()));
    }
    for shell in Shell::ALL {
        files.push((shell.file(&name), completion(cmd.clone(), shell)));
    }
    let mut written = Vec::new();
    for (rel, text) in files {
        let path = out.join(rel);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| at(dir, e))?;
        }
        std::fs::write(&path, text).map_err(|e| at(&path, e))?;
        written.push(path);
    }
    written.sort();
    Ok(written)
}

/// Why a template cannot be filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateError(pub String);

impl std::fmt::Display for TemplateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TemplateError {}

/// The `.ds Aq` preamble roff (clap_mangen's writer) puts before each fragment; the page
/// carries it once.
const AQ_PREAMBLE: &str = ".ie \\n(.g .ds Aq \\(aq\n.el .ds Aq '\n";

/// Fill in `template` for `cmd`: `@SYNOPSIS@` (the SYNOPSIS section), `@OPTIONS@` (OPTIONS),
/// `@COMMANDS@` (COMMANDS: each subcommand with its synopsis, description and options), each
/// alone on its line, and `@VERSION@` anywhere. Every placeholder must be known, and
/// `@SYNOPSIS@` and `@OPTIONS@` must be there.
pub fn man_page(cmd: clap::Command, template: &str) -> Result<String, TemplateError> {
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let version = cmd.get_version().unwrap_or_default().to_owned();
    let man = clap_mangen::Man::new(cmd.clone());
    let mut out = String::new();
    let mut seen = Vec::new();
    for line in template.lines() {
        match line.trim_end() {
            "@SYNOPSIS@" => {
                seen.push("SYNOPSIS");
                out.push_str(&fragment(|w| man.render_synopsis_section(w)));
            }
            "@OPTIONS@" => {
                seen.push("OPTIONS");
                out.push_str(&fragment(|w| man.render_options_section(w)));
            }
            "@COMMANDS@" => {
                seen.push("COMMANDS");
                out.push_str(".SH COMMANDS\n");
                commands(&cmd, &mut out);
            }
            l => {
                out.push_str(&l.replace("@VERSION@", &version));
                out.push('\n');
            }
        }
    }
    for want in ["SYNOPSIS", "OPTIONS"] {
        if !seen.contains(&want) {
            return Err(TemplateError(format!("the template has no @{want}@ line")));
        }
    }
    // Comments may name the placeholders.
    for line in out.lines().filter(|l| !l.starts_with(".\\\"")) {
        for (i, _) in line.match_indices('@') {
            let rest = &line[i + 1..];
            let word: String = rest
                .chars()
                .take_while(|c| c.is_ascii_uppercase())
                .collect();
            if !word.is_empty() && rest[word.len()..].starts_with('@') {
                return Err(TemplateError(format!(
                    "unknown placeholder @{word}@ (known: @SYNOPSIS@, @OPTIONS@, @COMMANDS@, \
                     @VERSION@, each but @VERSION@ alone on its line)"
                )));
            }
        }
    }
    // The apostrophe preamble once, after the leading comments.
    let body = out.replace(AQ_PREAMBLE, "");
    let split = body
        .lines()
        .take_while(|l| l.starts_with(".\\\""))
        .map(|l| l.len() + 1)
        .sum::<usize>();
    Ok(format!("{}{AQ_PREAMBLE}{}", &body[..split], &body[split..]))
}

/// Each subcommand of `cmd` (recursively, skipping hidden ones): `.SS` with its full name,
/// its synopsis, its description, its own options (not --help nor the global ones).
fn commands(cmd: &clap::Command, out: &mut String) {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let full = sub
            .get_bin_name()
            .map_or_else(|| sub.get_name().to_owned(), str::to_owned);
        let bare = sub.clone().mut_args(|a| {
            if a.is_global_set() || a.get_id() == "help" {
                a.hide(true)
            } else {
                a
            }
        });
        let man = clap_mangen::Man::new(bare.clone());
        out.push_str(&format!(".SS \"{}\"\n", full.replace('-', "\\-")));
        out.push_str(&strip_heading(&fragment(|w| {
            man.render_synopsis_section(w)
        })));
        let about = sub.get_long_about().or_else(|| sub.get_about());
        if let Some(about) = about {
            out.push_str(".PP\n");
            for l in about.to_string().lines() {
                out.push_str(&text_line(l));
                out.push('\n');
            }
        }
        if bare.get_arguments().any(|a| !a.is_hide_set()) {
            out.push_str(&strip_heading(&fragment(|w| man.render_options_section(w))));
        }
        commands(sub, out);
    }
}

/// A fragment clap_mangen renders, as text.
fn fragment(render: impl FnOnce(&mut dyn io::Write) -> io::Result<()>) -> String {
    let mut buf = Vec::new();
    // Writing to a Vec cannot fail.
    let _ = render(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// A fragment without its `.SH` line (for a subcommand's synopsis and options).
fn strip_heading(fragment: &str) -> String {
    let fragment = fragment.replace(AQ_PREAMBLE, "");
    let mut out = String::new();
    for l in fragment.lines().filter(|l| !l.starts_with(".SH ")) {
        out.push_str(l);
        out.push('\n');
    }
    out
}

/// Plain text as a roff text line: backslashes and hyphen-minus escaped, a leading `.` or
/// `'` made literal.
pub fn text_line(text: &str) -> String {
    let escaped = text.replace('\\', "\\e").replace('-', "\\-");
    if escaped.starts_with('.') || escaped.starts_with('\'') {
        format!("\\&{escaped}")
    } else {
        escaped
    }
}

/// groff's warnings for a man page (`groff -man -ww -z`, as `man --warnings` runs it but with
/// every warning on); empty when there are none. Errors when groff cannot be run (it is in
/// groff-base; tests/deps.sh installs it).
pub fn groff_warnings(page: &str) -> io::Result<String> {
    use std::io::Write as _;
    let mut child = std::process::Command::new("groff")
        .args(["-man", "-ww", "-z", "-Tutf8", "-rLL=80n"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot run groff (groff-base): {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(page.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

fn at(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEMPLATE: &str = ".\\\" demo(8)
.TH DEMO 8 \"\" \"demo @VERSION@\" \"System Administration\"
.SH NAME
demo \\- a demo program
@SYNOPSIS@
.SH DESCRIPTION
It demonstrates.
@OPTIONS@
@COMMANDS@
.SH SEE ALSO
.BR meshd (8)
";

    fn demo() -> clap::Command {
        clap::Command::new("demo")
            .version("1.2.3")
            .about("A demo program")
            .arg(clap::arg!(--config <PATH> "Configuration file").global(true))
            .subcommand(
                clap::Command::new("peers")
                    .about("List the peers")
                    .arg(clap::arg!(--json "Print JSON")),
            )
            .subcommand(
                clap::Command::new("routes")
                    .about("The routes")
                    .subcommand(clap::Command::new("approve").about("Approve one")),
            )
    }

    #[test]
    fn only_exactly_prog_option_dir_asks_for_docs() {
        assert_eq!(
            requested_in(["meshd", "--generate-docs", "/tmp/d"]),
            Some(PathBuf::from("/tmp/d"))
        );
        for args in [
            &["meshd"][..],
            &["meshd", "--generate-docs"],
            &["meshd", "--config", "/tmp/d"],
            &["meshd", "--generate-docs", "/tmp/d", "--down"],
            &["meshctl", "join", "--generate-docs"],
        ] {
            assert_eq!(requested_in(args.iter().copied()), None, "{args:?}");
        }
    }

    #[test]
    fn the_template_is_filled_in_from_clap() {
        let page = man_page(demo(), TEMPLATE).expect("renders");
        assert!(page.contains("\"demo 1.2.3\""), "{page}");
        assert!(page.contains(".SH SYNOPSIS\n"), "{page}");
        assert!(page.contains(".SH OPTIONS\n"), "{page}");
        assert!(page.contains("\\-\\-config"), "{page}");
        assert!(page.contains(".SS \"demo peers\""), "{page}");
        assert!(page.contains(".SS \"demo routes approve\""), "{page}");
        assert!(page.contains("Print JSON"), "{page}");
        assert!(!page.contains("@VERSION@"), "{page}");
        assert_eq!(page.matches(AQ_PREAMBLE).count(), 1, "{page}");
        assert!(page.starts_with(".\\\" demo(8)\n.ie"), "{page}");
        // The global option and --help are the root's, not repeated under each command.
        let peers = &page[page.find(".SS \"demo peers\"").expect("peers")..];
        let peers = &peers[..peers.find(".SS \"demo routes\"").expect("routes")];
        assert!(
            !peers.contains("config") && !peers.contains("help"),
            "{peers}"
        );
        let warnings = groff_warnings(&page).expect("groff runs");
        assert!(warnings.is_empty(), "{warnings}\n{page}");
    }

    #[test]
    fn templates_missing_or_misspelling_placeholders_are_refused() {
        let e = man_page(demo(), ".TH DEMO 8\n@SYNOPSIS@\n").expect_err("no options");
        assert!(e.to_string().contains("@OPTIONS@"), "{e}");
        let e = man_page(demo(), "@SYNOPSIS@\n@OPTIONS@\n@OPTION@\n").expect_err("typo");
        assert!(e.to_string().contains("@OPTION@"), "{e}");
    }

    #[test]
    fn writes_pages_and_completions() {
        let dir = tempfile::tempdir().expect("tempdir");
        let extra = vec![("demo.conf.5".to_string(), ".TH DEMO.CONF 5\n".to_string())];
        let files = write_docs(demo(), TEMPLATE, &extra, dir.path()).expect("write");
        let names: Vec<String> = files
            .iter()
            .map(|p| {
                p.strip_prefix(dir.path())
                    .expect("under out")
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        assert_eq!(
            names,
            [
                "bash/demo",
                "fish/demo.fish",
                "man/demo.8",
                "man/demo.conf.5",
                "zsh/_demo"
            ]
        );
        let bash = std::fs::read_to_string(dir.path().join("bash/demo")).expect("bash");
        assert!(bash.contains("complete -F"), "{bash}");
        assert!(
            bash.contains("peers") && bash.contains("--config"),
            "{bash}"
        );
        assert_eq!(
            bash.as_bytes(),
            completion(demo(), Shell::Bash).as_slice(),
            "the package's file is what `completion bash` prints"
        );
        let fish = std::fs::read_to_string(dir.path().join("fish/demo.fish")).expect("fish");
        assert!(fish.contains("-l config"), "{fish}");
    }

    #[test]
    fn unwritable_output_is_an_error_naming_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, "x").expect("write");
        let err = write_docs(demo(), TEMPLATE, &[], &file).expect_err("a file is not a directory");
        assert!(err.to_string().contains("not-a-dir"), "{err}");
    }
}
