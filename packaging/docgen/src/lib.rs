//! Man pages and shell completions for a clap command, written at package build time.
//!
//! `meshd --generate-docs DIR` and `meshctl --generate-docs DIR` call [`generate`] with their
//! own `clap::Command`, so the pages and completions cannot drift from the options the binaries
//! really parse. `packaging/build-deb.sh` runs them and cargo-deb packs the result. The option
//! is deliberately not part of the clap definitions: clap_complete offers hidden options and
//! subcommands in the completions it writes, so [`requested`] looks at the raw arguments
//! instead (exactly `PROG --generate-docs DIR`). Layout under `DIR`:
//!
//! ```text
//! man/NAME.1, man/NAME-SUBCOMMAND.1 ...   section 1 pages
//! bash/NAME                               /usr/share/bash-completion/completions/NAME
//! zsh/_NAME                               /usr/share/zsh/vendor-completions/_NAME
//! fish/NAME.fish                          /usr/share/fish/vendor_completions.d/NAME.fish
//! ```

use std::io;
use std::path::{Path, PathBuf};

use clap_complete::Shell;

/// The option that asks a binary for its docs (see the module docs).
pub const OPTION: &str = "--generate-docs";

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

/// Write the docs for `cmd` under `dir` ([`write_docs`]) and say what was written on stderr;
/// the process' exit code.
pub fn generate(cmd: clap::Command, dir: &Path) -> std::process::ExitCode {
    let name = cmd.get_name().to_owned();
    match write_docs(cmd, dir) {
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

/// Write `cmd`'s man pages and its bash, zsh and fish completions under `out` (see the module
/// docs for the layout). Returns the files written.
pub fn write_docs(cmd: clap::Command, out: &Path) -> io::Result<Vec<PathBuf>> {
    let name = cmd.get_name().to_owned();
    let mut written = Vec::new();

    let man_dir = out.join("man");
    std::fs::create_dir_all(&man_dir).map_err(|e| at(&man_dir, e))?;
    let before: Vec<PathBuf> = list(&man_dir)?;
    clap_mangen::generate_to(cmd.clone(), &man_dir).map_err(|e| at(&man_dir, e))?;
    for p in list(&man_dir)? {
        if !before.contains(&p) {
            written.push(p);
        }
    }

    for (shell, dir, file) in [
        (Shell::Bash, "bash", name.clone()),
        (Shell::Zsh, "zsh", format!("_{name}")),
        (Shell::Fish, "fish", format!("{name}.fish")),
    ] {
        let dir = out.join(dir);
        std::fs::create_dir_all(&dir).map_err(|e| at(&dir, e))?;
        let mut text = Vec::new();
        clap_complete::generate(shell, &mut cmd.clone(), &name, &mut text);
        let path = dir.join(file);
        std::fs::write(&path, text).map_err(|e| at(&path, e))?;
        written.push(path);
    }
    written.sort();
    Ok(written)
}

fn list(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| at(dir, e))? {
        v.push(e.map_err(|e| at(dir, e))?.path());
    }
    Ok(v)
}

fn at(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demo() -> clap::Command {
        clap::Command::new("demo")
            .version("1.2.3")
            .about("A demo program")
            .arg(clap::arg!(--config <PATH> "Configuration file"))
            .subcommand(clap::Command::new("peers").about("List the peers"))
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
    fn writes_pages_and_completions() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = write_docs(demo(), dir.path()).expect("write");
        let names: Vec<String> = files
            .iter()
            .map(|p| {
                p.strip_prefix(dir.path())
                    .expect("under out")
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        for want in [
            "man/demo.1",
            "man/demo-peers.1",
            "bash/demo",
            "zsh/_demo",
            "fish/demo.fish",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} missing: {names:?}");
        }
        let page = std::fs::read_to_string(dir.path().join("man/demo.1")).expect("page");
        assert!(page.contains(".TH demo 1"), "{page}");
        assert!(page.contains("\\-\\-config"), "{page}");
        let bash = std::fs::read_to_string(dir.path().join("bash/demo")).expect("bash");
        assert!(bash.contains("complete -F"), "{bash}");
        assert!(
            bash.contains("peers") && bash.contains("--config"),
            "{bash}"
        );
        let fish = std::fs::read_to_string(dir.path().join("fish/demo.fish")).expect("fish");
        assert!(fish.contains("-l config"), "{fish}");
    }

    #[test]
    fn unwritable_output_is_an_error_naming_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, "x").expect("write");
        let err = write_docs(demo(), &file).expect_err("a file is not a directory");
        assert!(err.to_string().contains("not-a-dir"), "{err}");
    }
}
