//! Man pages and shell completions for a clap command, written at package build time.
//!
//! `meshd --generate-docs DIR` and `meshctl generate-docs DIR` (both hidden) call
//! [`write_docs`] with their own `clap::Command`, so the pages and completions cannot drift
//! from the options the binaries really parse. `packaging/build-deb.sh` runs them and cargo-deb
//! packs the result. Layout under `DIR`:
//!
//! ```text
//! man/NAME.1, man/NAME-SUBCOMMAND.1 ...   section 1 pages (hidden subcommands left out)
//! bash/NAME                               /usr/share/bash-completion/completions/NAME
//! zsh/_NAME                               /usr/share/zsh/vendor-completions/_NAME
//! fish/NAME.fish                          /usr/share/fish/vendor_completions.d/NAME.fish
//! ```

use std::io;
use std::path::{Path, PathBuf};

use clap_complete::Shell;

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
            .subcommand(
                clap::Command::new("secret")
                    .about("Not for people")
                    .hide(true),
            )
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
        assert!(
            !names.iter().any(|n| n.contains("secret")),
            "a hidden subcommand got a page: {names:?}"
        );
        let page = std::fs::read_to_string(dir.path().join("man/demo.1")).expect("page");
        assert!(page.contains(".TH demo 1"), "{page}");
        assert!(page.contains("\\-\\-config"), "{page}");
        let bash = std::fs::read_to_string(dir.path().join("bash/demo")).expect("bash");
        assert!(bash.contains("complete -F"), "{bash}");
        assert!(bash.contains("peers") && !bash.contains("secret"), "{bash}");
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
