//! What the package puts under /usr/share/doc/meshd cites only what the package ships (the
//! example configs used to point at `docs/ARCHITECTURE.md` and `proto/tests/configs.rs`,
//! neither of which an installed host had). Reads the package's assets from daemon/Cargo.toml.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// (source file in the repository, installed path) for every asset of the .deb; built files
/// (binaries, man pages, completions) have no source here.
fn shipped() -> Vec<(Option<PathBuf>, String)> {
    let manifest = std::fs::read_to_string(repo().join("daemon/Cargo.toml")).expect("manifest");
    let v: toml::Value = manifest.parse().expect("toml");
    let assets = v["package"]["metadata"]["deb"]["assets"]
        .as_array()
        .expect("assets");
    let mut out = Vec::new();
    for a in assets {
        let (src, dest) = (a[0].as_str().expect("src"), a[1].as_str().expect("dest"));
        if src.starts_with("target/") {
            out.push((None, format!("/{dest}")));
            continue;
        }
        let src = repo().join("daemon").join(src);
        let dir = src.parent().expect("dir").to_path_buf();
        let pattern = src
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        let files: Vec<PathBuf> = match pattern.split_once('*') {
            Some((pre, post)) => std::fs::read_dir(&dir)
                .expect("asset dir")
                .map(|e| e.expect("entry").path())
                .filter(|p| {
                    let n = p.file_name().expect("name").to_string_lossy();
                    n.starts_with(pre) && n.ends_with(post)
                })
                .collect(),
            None => vec![src.clone()],
        };
        assert!(!files.is_empty(), "asset {src:?} matches no file");
        for f in files {
            let installed = if dest.ends_with('/') {
                format!("/{dest}{}", f.file_name().expect("name").to_string_lossy())
            } else {
                format!("/{dest}")
            };
            out.push((Some(f), installed));
        }
    }
    out
}

/// Every path-like word of `text` (with a `/`) naming a file of the kinds the docs cite.
fn cited_paths(text: &str) -> Vec<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || "/._-".contains(c)))
        .map(|w| w.trim_end_matches('.'))
        .filter(|w| w.contains('/'))
        .filter(|w| {
            [".md", ".rs", ".toml", ".yml", ".json"]
                .iter()
                .any(|ext| w.ends_with(ext))
        })
        .map(str::to_owned)
        .collect()
}

/// Where `cited` (as written in the file installed at `at`) is on an installed host.
fn resolve(at: &str, cited: &str) -> String {
    if cited.starts_with('/') {
        cited.to_string()
    } else if cited.starts_with("docs/") {
        // As the source tree says it: the package ships docs/ under /usr/share/doc/meshd.
        format!("/usr/share/doc/meshd/{cited}")
    } else {
        let dir = Path::new(at).parent().expect("dir");
        dir.join(cited).display().to_string()
    }
}

#[test]
fn examples_and_conffile_cite_only_what_the_package_ships() {
    let shipped = shipped();
    let installed: BTreeSet<&str> = shipped.iter().map(|(_, i)| i.as_str()).collect();
    // Files meshd or the operator writes on the host, which the docs may name.
    let host_files = [
        "/etc/meshd/meshd.toml",
        "/etc/prometheus/file_sd/meshd.json",
        "/etc/prometheus/prometheus.yml",
    ];
    let mut checked = 0;
    let mut wrong = Vec::new();
    for (src, at) in &shipped {
        let Some(src) = src else { continue };
        if !(at.starts_with("/usr/share/doc/meshd/examples/") || at == "/etc/meshd/meshd.toml") {
            continue;
        }
        checked += 1;
        let text = std::fs::read_to_string(src).expect("read");
        for p in cited_paths(&text) {
            let resolved = resolve(at, &p);
            if !installed.contains(resolved.as_str()) && !host_files.contains(&resolved.as_str()) {
                wrong.push(format!("{at} cites {p} ({resolved} is not in the package)"));
            }
        }
    }
    assert!(checked >= 10, "only {checked} files checked: {shipped:?}");
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn the_citation_check_can_fail() {
    let text = "Parsed by proto/tests/configs.rs. See docs/ARCHITECTURE.md, or ./x.yml.";
    let cited = cited_paths(text);
    assert_eq!(
        cited,
        ["proto/tests/configs.rs", "docs/ARCHITECTURE.md", "./x.yml"]
    );
    let at = "/usr/share/doc/meshd/examples/a.toml";
    assert_eq!(
        resolve(at, "proto/tests/configs.rs"),
        "/usr/share/doc/meshd/examples/proto/tests/configs.rs"
    );
    assert_eq!(
        resolve(at, "docs/ARCHITECTURE.md"),
        "/usr/share/doc/meshd/docs/ARCHITECTURE.md"
    );
}

#[test]
fn the_docs_the_readme_links_and_the_alerting_rules_are_shipped() {
    let shipped = shipped();
    let installed: BTreeSet<&str> = shipped.iter().map(|(_, i)| i.as_str()).collect();
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("README");
    let docs: Vec<String> = cited_paths(&readme)
        .into_iter()
        .filter(|p| p.starts_with("docs/"))
        .collect();
    assert!(!docs.is_empty(), "the README links no docs/ file");
    for p in docs {
        let at = format!("/usr/share/doc/meshd/{p}");
        assert!(
            installed.contains(at.as_str()),
            "README links {p}, not shipped"
        );
    }
    for ex in [
        "prometheus-meshd-rules.yml",
        "prometheus-meshd-rules.test.yml",
        "grafana-meshd.json",
    ] {
        let at = format!("/usr/share/doc/meshd/examples/{ex}");
        assert!(installed.contains(at.as_str()), "{at} not shipped");
    }
}
