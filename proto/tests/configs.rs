//! Every example in `configs/` must parse, and together they must describe one consistent fleet.

use std::collections::BTreeMap;
use std::path::PathBuf;

use mesh_proto::config::{self, Config};
use mesh_proto::PublicKey;

fn load_all() -> Vec<(PathBuf, Config)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "no *.toml files in {}: the examples must not silently disappear",
        dir.display()
    );
    files
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
            let cfg =
                config::parse(&text, &path.display().to_string()).unwrap_or_else(|e| panic!("{e}"));
            (path, cfg)
        })
        .collect()
}

#[test]
fn every_example_config_parses() {
    for (path, cfg) in load_all() {
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
        assert_eq!(
            cfg.host.name,
            stem,
            "{}: host.name should match the file name",
            path.display()
        );
    }
}

#[test]
fn example_fleet_is_consistent() {
    let all = load_all();
    // Every host names every peer with the same key and the same allowed IPs.
    let mut key_of: BTreeMap<String, (PublicKey, String)> = BTreeMap::new();
    let mut ips_of: BTreeMap<String, (Vec<ipnet::IpNet>, String)> = BTreeMap::new();
    for (path, cfg) in &all {
        for p in &cfg.peers {
            let here = path.display().to_string();
            if let Some((k, there)) = key_of.insert(p.name.clone(), (p.public_key, here.clone())) {
                assert_eq!(
                    k, p.public_key,
                    "{}: key differs between {there} and {here}",
                    p.name
                );
            }
            if let Some((ips, there)) =
                ips_of.insert(p.name.clone(), (p.allowed_ips.clone(), here.clone()))
            {
                assert_eq!(
                    ips, p.allowed_ips,
                    "{}: allowed_ips differ between {there} and {here}",
                    p.name
                );
            }
        }
    }
    // Each host's own address is what the others route to it, and all share one mesh prefix.
    let prefix = all[0].1.mesh_prefix();
    for (path, cfg) in &all {
        assert_eq!(cfg.mesh_prefix(), prefix, "{}", path.display());
        if let Some((ips, _)) = ips_of.get(&cfg.host.name) {
            assert!(
                ips.iter().any(|n| n.contains(&cfg.mesh_address())),
                "{}: peers do not route {} to {}",
                path.display(),
                cfg.mesh_address(),
                cfg.host.name
            );
        }
        // Every other example host is a peer of this one.
        for (_, other) in &all {
            if other.host.name != cfg.host.name {
                assert!(
                    cfg.peers.iter().any(|p| p.name == other.host.name),
                    "{}: missing peer {}",
                    path.display(),
                    other.host.name
                );
            }
        }
    }
}
