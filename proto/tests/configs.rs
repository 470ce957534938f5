//! Every example in `configs/` must parse, and together the static ones (no `[coordinator]`,
//! a fixed name) must describe one consistent fleet.

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
        match cfg.host_name() {
            // dock-load-coordinator.toml is dock-load's coordinator variant.
            Some(name) => assert!(
                stem == name || stem.starts_with(&format!("{name}-")),
                "{}: host.name should match the file name",
                path.display()
            ),
            // A joining host learns its name from its token.
            None => assert!(
                cfg.daemon.join_token_file.is_some() && cfg.peers.is_empty(),
                "{}: a config without host.name should join with a token",
                path.display()
            ),
        }
        if let Some(c) = &cfg.coordinator {
            let own = cfg.mesh_address().expect("the coordinator has an address");
            assert!(c.mesh_cidr.contains(&own), "{}", path.display());
            assert_eq!(cfg.mesh_prefix(), Some(c.mesh_cidr), "{}", path.display());
        }
    }
}

/// The coordinator's address plan agrees with the static fleet's addresses.
#[test]
fn coordinator_plan_matches_the_static_fleet() {
    let all = load_all();
    let Some((path, coord)) = all.iter().find(|(_, c)| c.coordinator.is_some()) else {
        panic!("no example coordinator config");
    };
    let plan = &coord
        .coordinator
        .as_ref()
        .expect("coordinator")
        .static_assignments;
    for (_, cfg) in all.iter().filter(|(_, c)| c.coordinator.is_none()) {
        let (Some(name), Some(addr)) = (cfg.host_name(), cfg.mesh_address()) else {
            continue;
        };
        assert_eq!(
            plan.get(name),
            Some(&addr),
            "{}: static assignment of {name}",
            path.display()
        );
    }
}

#[test]
fn example_fleet_is_consistent() {
    let all: Vec<(PathBuf, Config)> = load_all()
        .into_iter()
        .filter(|(_, c)| c.coordinator.is_none() && c.host_name().is_some())
        .collect();
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
        let name = cfg.host_name().unwrap_or_default();
        let own = cfg.mesh_address().expect("static hosts have an address");
        if let Some((ips, _)) = ips_of.get(name) {
            assert!(
                ips.iter().any(|n| n.contains(&own)),
                "{}: peers do not route {own} to {name}",
                path.display(),
            );
        }
        // Every other example host is a peer of this one.
        for (_, other) in &all {
            if other.host.name != cfg.host.name {
                assert!(
                    cfg.peers
                        .iter()
                        .any(|p| Some(p.name.as_str()) == other.host_name()),
                    "{}: missing peer {:?}",
                    path.display(),
                    other.host.name
                );
            }
        }
    }
}

/// The package's `/etc/meshd/meshd.toml` (packaging/debian/meshd.toml).
fn packaged_default() -> (String, String) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../packaging/debian/meshd.toml");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    (path.display().to_string(), text)
}

/// As shipped, the conffile parses and forms no mesh by itself: no name, no address, no
/// peers, no coordinator and no token, so meshd waits for `meshctl join -`.
#[test]
fn the_packaged_default_config_parses_and_forms_no_mesh() {
    let (path, text) = packaged_default();
    let cfg = config::parse(&text, &path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.host_name(), None, "{path}");
    assert_eq!(cfg.mesh_address(), None, "{path}");
    assert!(cfg.peers.is_empty(), "{path}: static peers");
    assert!(cfg.coordinator.is_none(), "{path}: a coordinator");
    assert!(cfg.daemon.join_token_file.is_none(), "{path}: a join token");
}

/// Its commented examples are real keys with valid values: uncommenting every `#key = ...`
/// and `#[table]` line (all but the join token, which a coordinator does not take) gives a
/// configuration meshd accepts.
#[test]
fn the_packaged_default_config_examples_parse_when_uncommented() {
    let (path, text) = packaged_default();
    let uncommented: String = text
        .lines()
        .map(|line| match line.strip_prefix('#') {
            Some(rest)
                if !rest.starts_with("join_token_file")
                    && (rest.starts_with('[')
                        || rest.split_once(" = ").is_some_and(|(k, _)| {
                            !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                        })) =>
            {
                rest.to_owned()
            }
            _ => line.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
        // The placeholder key: a valid one (32 bytes of 0x01).
        .replace("BASE64...", "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=");
    let cfg = config::parse(&uncommented, &path)
        .unwrap_or_else(|e| panic!("{e}\n--- uncommented:\n{uncommented}"));
    assert_eq!(cfg.host_name(), Some("dock-load"));
    assert!(cfg.coordinator.is_some());
    assert_eq!(cfg.peers.len(), 1);
}
