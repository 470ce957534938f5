//! Tests of the configuration's meaning and its errors: every key, its defaults and every
//! refusal, with the key and line it names.

use super::*;

const FILE: &str = "/etc/meshd/meshd.toml";

fn key(i: u8) -> String {
    PublicKey([i; 32]).to_string()
}

fn base() -> String {
    format!(
        r#"# test config
[host]
name = "dock-load"
address = "10.99.99.1/24"

[[peer]]
name = "dock-prod"
public_key = "{}"
endpoint = "198.51.100.2:51871"
allowed_ips = ["10.99.99.2/32"]

[[peer]]
name = "dock-mirror"
public_key = "{}"
allowed_ips = ["10.99.99.3/32"]
persistent_keepalive = 25
"#,
        key(2),
        key(3)
    )
}

/// The first error (in file order) of a refused `text`: its key, and its full text containing
/// `want_in_message`.
fn refuse(text: &str, want_key: &str, want_in_message: &str) -> ConfigError {
    let errors = parse(text, FILE).expect_err(text);
    let err = errors.first().clone();
    let shown = err.to_string();
    assert_eq!(errors.file, FILE);
    assert_eq!(err.file, FILE);
    assert!(shown.starts_with(&format!("{FILE}:")), "{shown}");
    assert_eq!(err.key.as_deref(), Some(want_key), "{errors}");
    assert!(
        shown.contains(want_in_message),
        "{shown:?} should contain {want_in_message:?}"
    );
    err
}

#[test]
fn parses_with_defaults() {
    let c = parse(&base(), FILE).unwrap();
    assert_eq!(c.host.name.as_deref(), Some("dock-load"));
    assert_eq!(c.host_name(), Some("dock-load"));
    assert!(c.coordinator.is_none());
    assert!(!c.is_coordinator());
    assert_eq!(c.host.interface, "wgmesh0");
    assert_eq!(c.host.listen_port, 51871);
    assert_eq!(c.host.mtu, 1420);
    assert_eq!(
        c.host.private_key_file,
        PathBuf::from("/etc/meshd/private.key")
    );
    assert_eq!(c.daemon, DaemonConfig::default());
    assert_eq!(c.daemon.reconcile_interval(), Duration::from_secs(10));
    assert_eq!(
        c.mesh_address(),
        Some("10.99.99.1".parse::<IpAddr>().unwrap())
    );
    assert_eq!(
        c.mesh_prefix(),
        Some("10.99.99.0/24".parse::<IpNet>().unwrap())
    );
    assert_eq!(c.peers.len(), 2);
    assert_eq!(c.peer_name(&PublicKey([3; 32])), Some("dock-mirror"));
    assert_eq!(c.peer_name(&PublicKey([9; 32])), None);
    let specs = c.peer_specs();
    assert_eq!(specs.len(), 2);
    let prod = &specs[&PublicKey([2; 32])];
    assert_eq!(prod.endpoint, Some("198.51.100.2:51871".parse().unwrap()));
    assert_eq!(prod.persistent_keepalive, None);
    assert_eq!(specs[&PublicKey([3; 32])].persistent_keepalive, Some(25));
    let spec = c.device_spec(PrivateKey::from_bytes([1; 32]));
    assert_eq!(spec.listen_port, 51871);
    assert_eq!(spec.peers, specs);
}

#[test]
fn parses_everything_explicit() {
    let text = format!(
        r#"
[host]
name = "dock-edge"
address = "10.99.99.4/24"
interface = "wg.mesh_1"
listen_port = 51999
private_key_file = "/var/lib/meshd/key"
mtu = 1380

[daemon]
control_socket = "/tmp/x/meshd.sock"
backend = "userspace"
engine_command = "/usr/local/bin/meshd-wg"
reconcile_interval_secs = 3

[[peer]]
name = "nas"
public_key = "{}"
endpoint = "[2001:db8::20]:51820"
allowed_ips = ["10.99.99.20/32", "fd00::/64"]
persistent_keepalive = 0
"#,
        key(7)
    );
    let c = parse(&text, FILE).unwrap();
    assert_eq!(c.host.interface, "wg.mesh_1");
    assert_eq!(c.host.mtu, 1380);
    assert_eq!(c.daemon.backend, BackendKind::Userspace);
    assert_eq!(
        c.daemon.engine_command,
        Some(PathBuf::from("/usr/local/bin/meshd-wg"))
    );
    assert_eq!(c.daemon.reconcile_interval_secs, 3);
    assert_eq!(c.peers[0].persistent_keepalive, Some(0));
    assert_eq!(
        c.peer_specs()[&PublicKey([7; 32])].persistent_keepalive,
        None
    );
    // Serialize writes the same format back.
    let again = toml::to_string(&c).unwrap();
    assert_eq!(parse(&again, FILE).unwrap(), c);
}

#[test]
fn no_peers_is_fine() {
    let c = parse("[host]\nname = \"a\"\naddress = \"10.0.0.1/24\"\n", FILE).unwrap();
    assert!(c.peers.is_empty());
}

#[test]
fn refuses_unknown_keys_with_line() {
    let t = base().replace("mtu", "x").replace(
        "address = \"10.99.99.1/24\"",
        "address = \"10.99.99.1/24\"\nlisten_prot = 1",
    );
    let e = refuse(&t, "host.listen_prot", "unknown key `listen_prot` in host");
    assert_eq!(
        e.location.as_ref().map(|l| (l.line, l.column)),
        Some((5, 1)),
        "{e}"
    );

    let t = base().replace(
        "persistent_keepalive = 25",
        "persistent_keepalive = 25\nkeepalive = 3",
    );
    refuse(
        &t,
        "peer \"dock-mirror\".keepalive",
        &format!("{FILE}:17:1:"),
    );

    let t = format!("{}\n[deamon]\nbackend = \"userspace\"\n", base());
    refuse(&t, "deamon", "unknown key `deamon` at the top level");

    let t = base().replace("[host]", "[host]\n[daemon]\nsocket = \"/x\"\n[host]");
    assert!(parse(&t, FILE).is_err());
    let t = format!("{}\n[daemon]\nsocket = \"/x\"\n", base());
    refuse(&t, "daemon.socket", "unknown key");
}

#[test]
fn refuses_syntax_errors_with_line() {
    let t = base().replace("name = \"dock-prod\"", "name = dock-prod");
    let e = refuse(
        &t,
        "peer[0].name",
        &format!("{FILE}:7:8: peer[0].name: not valid TOML"),
    );
    assert!(e.to_string().contains(FILE));
    let t = base().replace("listen", "").replace(
        "[[peer]]\nname = \"dock-mirror\"",
        "[[peer]\nname = \"dock-mirror\"",
    );
    let e = parse(&t, FILE).unwrap_err();
    assert_eq!(e.len(), 1, "a syntax error is the one error: {e}");
    assert_eq!(e.first().location.as_ref().map(|l| l.line), Some(12), "{e}");
}

#[test]
fn refuses_wrong_types_and_missing_fields() {
    let t = base().replace("persistent_keepalive = 25", "persistent_keepalive = \"25\"");
    refuse(
        &t,
        "peer \"dock-mirror\".persistent_keepalive",
        &format!(
            "{FILE}:16:24: peer \"dock-mirror\".persistent_keepalive: must be a whole number \
                  without quotes: persistent_keepalive = 25"
        ),
    );
    let t = base().replace("name = \"dock-load\"\n", "");
    refuse(&t, "host.name", "is missing");
    let t = base().replace("allowed_ips = [\"10.99.99.3/32\"]\n", "");
    refuse(&t, "peer \"dock-mirror\".allowed_ips", "is missing");
    let t = base().replace("address = \"10.99.99.1/24\"\n", "");
    refuse(&t, "host.address", "is missing");
    // Without static peers or [coordinator], a host may get everything from a join.
    let c = parse("", FILE).unwrap();
    assert_eq!(c.host.name, None);
    assert_eq!(c.mesh_address(), None);
    assert_eq!(c.mesh_prefix(), None);
    assert_eq!(c.daemon, DaemonConfig::default());
}

#[test]
fn refuses_bad_host_values() {
    let b = base();
    refuse(
        &b.replace("\"dock-load\"", "\"Dock-Load\""),
        "host.name",
        "lowercase",
    );
    refuse(
        &b.replace("\"dock-load\"", "\"-dock\""),
        "host.name",
        "start or end",
    );
    refuse(&b.replace("\"dock-load\"", "\"\""), "host.name", "1 to 63");
    refuse(
        &b.replace("\"dock-load\"", &format!("\"{}\"", "a".repeat(64))),
        "host.name",
        "1 to 63",
    );
    refuse(
        &b.replace("10.99.99.1/24", "10.99.99.1"),
        "host.address",
        "prefix length",
    );
    refuse(
        &b.replace("10.99.99.1/24", "10.99.99.0/24"),
        "host.address",
        "network or broadcast",
    );
    let with = |k: &str| {
        b.replace(
            "address = \"10.99.99.1/24\"",
            &format!("address = \"10.99.99.1/24\"\n{k}"),
        )
    };
    refuse(
        &with("listen_port = 0"),
        "host.listen_port",
        "out of range; a port is 1 to 65535",
    );
    refuse(
        &with("listen_port = 65536"),
        "host.listen_port",
        "out of range; a port is 1 to 65535",
    );
    refuse(
        &with("mtu = 1279"),
        "host.mtu",
        "out of range; the MTU is 1280 to 9000",
    );
    refuse(
        &with("mtu = 9001"),
        "host.mtu",
        "out of range; the MTU is 1280 to 9000",
    );
    refuse(
        &with("interface = \"a-very-long-name0\""),
        "host.interface",
        "1 to 15",
    );
    refuse(
        &with("interface = \"wg 0\""),
        "host.interface",
        "contains ' '",
    );
    refuse(&with("interface = \"..\""), "host.interface", "not a valid");
    refuse(&with("interface = \"\""), "host.interface", "1 to 15");
    refuse(
        &with("private_key_file = \"\""),
        "host.private_key_file",
        "empty",
    );
}

#[test]
fn refuses_bad_daemon_values() {
    let b = base();
    refuse(
        &format!("{b}\n[daemon]\nbackend = \"wireguard-go\"\n"),
        "daemon.backend",
        "not a backend",
    );
    refuse(
        &format!("{b}\n[daemon]\nreconcile_interval_secs = 0\n"),
        "daemon.reconcile_interval_secs",
        "out of range; the reconcile interval is 1 to 3600 seconds",
    );
    refuse(
        &format!("{b}\n[daemon]\nreconcile_interval_secs = 3601\n"),
        "daemon.reconcile_interval_secs",
        "out of range; the reconcile interval is 1 to 3600 seconds",
    );
    refuse(
        &format!("{b}\n[daemon]\ncontrol_socket = \"\"\n"),
        "daemon.control_socket",
        "empty",
    );
    refuse(
        &format!("{b}\n[daemon]\nengine_command = \" \"\n"),
        "daemon.engine_command",
        "empty",
    );
}

#[test]
fn refuses_bad_peer_values() {
    let b = base();
    refuse(
        &b.replace(&key(3), "not-a-key"),
        "peer \"dock-mirror\".public_key",
        "wg pubkey",
    );
    refuse(
        &b.replace(&key(3), &key(3)[..43]),
        "peer \"dock-mirror\".public_key",
        "base64",
    );
    refuse(
        &b.replace(&key(3), &format!("{}A", key(3))),
        "peer \"dock-mirror\".public_key",
        "base64",
    );
    refuse(
        &b.replace("198.51.100.2:51871", "dock-prod.example.com:51871"),
        "peer \"dock-prod\".endpoint",
        "only IP:port is accepted",
    );
    refuse(
        &b.replace("198.51.100.2:51871", "198.51.100.2"),
        "peer \"dock-prod\".endpoint",
        "no port",
    );
    refuse(
        &b.replace("198.51.100.2:51871", "198.51.100.2:0"),
        "peer \"dock-prod\".endpoint",
        "port 0",
    );
    refuse(
        &b.replace("198.51.100.2:51871", "2001:db8::1:51871"),
        "peer \"dock-prod\".endpoint",
        "[2001:db8::1]:51871",
    );
    refuse(
        &b.replace("[\"10.99.99.2/32\"]", "[]"),
        "peer \"dock-prod\".allowed_ips",
        "at least one",
    );
    refuse(
        &b.replace("10.99.99.2/32", "10.99.99.2/24"),
        "peer \"dock-prod\".allowed_ips[0]",
        "host bits set; did you mean \"10.99.99.2/32\"",
    );
    refuse(
        &b.replace("10.99.99.2/32", "10.99.99.2"),
        "peer \"dock-prod\".allowed_ips[0]",
        "10.99.99.2/32",
    );
    refuse(
        &b.replace("10.99.99.2/32", "nope"),
        "peer \"dock-prod\".allowed_ips[0]",
        "not a prefix",
    );
    refuse(
        &b.replace("persistent_keepalive = 25", "persistent_keepalive = -1"),
        "peer \"dock-mirror\".persistent_keepalive",
        "out of range; the keepalive is 0 to 65535 seconds",
    );
    refuse(
        &b.replace("persistent_keepalive = 25", "persistent_keepalive = 65536"),
        "peer \"dock-mirror\".persistent_keepalive",
        "out of range; the keepalive is 0 to 65535 seconds",
    );
    refuse(
        &b.replace("\"dock-prod\"", "\"dock_prod\""),
        "peer[0].name",
        "lowercase",
    );
}

#[test]
fn refuses_duplicates_and_overlaps() {
    let b = base();
    refuse(
        &b.replace("\"dock-mirror\"", "\"dock-prod\""),
        "peer[1].name",
        "already the name of peer \"dock-prod\"",
    );
    refuse(
        &b.replace("\"dock-mirror\"", "\"dock-load\""),
        "peer \"dock-load\".name",
        "own name",
    );
    refuse(
        &b.replace(&key(3), &key(2)),
        "peer \"dock-mirror\".public_key",
        "already the key of peer \"dock-prod\"",
    );
    let e = refuse(
        &b.replace("10.99.99.3/32", "10.99.99.0/25"),
        "peer \"dock-mirror\".allowed_ips[0]",
        "contains this host's own address 10.99.99.1",
    );
    assert!(e.message.contains("dock-mirror"));
    let e = refuse(
        &b.replace(
            "[\"10.99.99.3/32\"]",
            "[\"10.99.99.3/32\", \"10.99.99.2/31\"]",
        ),
        "peer \"dock-mirror\".allowed_ips[1]",
        "overlaps",
    );
    for part in [
        "10.99.99.2/31",
        "10.99.99.2/32",
        "\"dock-prod\"",
        "\"dock-mirror\"",
    ] {
        assert!(e.message.contains(part), "{e} should name {part}");
    }
    refuse(
        &b.replace("10.99.99.3/32", "10.99.99.2/32"),
        "peer \"dock-mirror\".allowed_ips[0]",
        "overlaps",
    );
}

#[test]
fn display_format() {
    let mut e = ConfigError {
        file: "f.toml".into(),
        key: Some("host.address".into()),
        message: "bad".into(),
        location: None,
    };
    assert_eq!(e.to_string(), "f.toml: host.address: bad");
    e.location = Some(Location::of("[host]\n\taddress = 1\n", 18));
    assert_eq!(e.one_line(), "f.toml:2:12: host.address: bad");
    assert_eq!(
        e.to_string(),
        "f.toml:2:12: host.address: bad\n  |\n2 | \taddress = 1\n  | \t          ^"
    );
    let e = ConfigError {
        file: "f.toml".into(),
        key: None,
        message: "bad".into(),
        location: None,
    };
    assert_eq!(e.to_string(), "f.toml: bad");
}

fn coordinator_base() -> String {
    r#"
[host]
name = "dock-load"
address = "10.99.99.1/24"

[coordinator]
mesh_cidr = "10.99.99.0/24"
public_endpoints = ["198.51.100.1:51871"]
"#
    .to_string()
}

#[test]
fn joining_host_config() {
    let c = parse(
        "[daemon]\njoin_token_file = \"/etc/meshd/join.token\"\nstate_dir = \"/srv/meshd\"\n",
        FILE,
    )
    .unwrap();
    assert_eq!(c.host_name(), None);
    assert_eq!(c.host.address, None);
    assert_eq!(c.host.interface, "wgmesh0");
    assert_eq!(
        c.daemon.join_token_file,
        Some(PathBuf::from("/etc/meshd/join.token"))
    );
    assert_eq!(c.daemon.state_dir, PathBuf::from("/srv/meshd"));
    let again = toml::to_string(&c).unwrap();
    assert_eq!(parse(&again, FILE).unwrap(), c);
    // [host] without name and address, as the lab writes it.
    let c = parse("[host]\nlisten_port = 51871\n\n[daemon]\n", FILE).unwrap();
    assert_eq!(c.daemon.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
    assert_eq!(c.daemon.join_token_file, None);
    refuse(
        "[daemon]\njoin_token_file = \"\"\n",
        "daemon.join_token_file",
        "empty",
    );
    refuse("[daemon]\nstate_dir = \"\"\n", "daemon.state_dir", "empty");
}

#[test]
fn coordinator_defaults_and_full() {
    let c = parse(&coordinator_base(), FILE).unwrap();
    let co = c.coordinator.clone().unwrap();
    assert!(c.is_coordinator());
    assert_eq!(co.mesh_cidr, "10.99.99.0/24".parse::<IpNet>().unwrap());
    assert_eq!(co.api_port, crate::wire::api::DEFAULT_API_PORT);
    assert_eq!(co.keepalive_secs, 25);
    assert!(co.reserved.is_empty());
    assert!(co.static_assignments.is_empty());
    assert_eq!(co.database, PathBuf::from(DEFAULT_DATABASE));
    let text = format!(
        "{}api_port = 4000\nreserved = [\"10.99.99.0/28\"]\nkeepalive_secs = 15\n\
         database = \"/srv/c.db\"\n\n[coordinator.static_assignments]\ndock-prod = \
         \"10.99.99.20\"\nnas = \"10.99.99.30\"\ndock-load = \"10.99.99.1\"\n",
        coordinator_base().replace("reserved", "x")
    );
    // The assignment of the coordinator itself must match its address: 10.99.99.1 is
    // reserved here, so it is refused.
    refuse(
        &text,
        "coordinator.static_assignments.dock-load",
        "reserved",
    );
    let text = text.replace("dock-load = \"10.99.99.1\"\n", "");
    let c = parse(&text, FILE).unwrap();
    let co = c.coordinator.clone().unwrap();
    assert_eq!(co.api_port, 4000);
    assert_eq!(co.keepalive_secs, 15);
    assert_eq!(co.reserved, vec!["10.99.99.0/28".parse::<IpNet>().unwrap()]);
    assert_eq!(co.database, PathBuf::from("/srv/c.db"));
    assert_eq!(
        co.static_assignments.get("nas"),
        Some(&"10.99.99.30".parse::<IpAddr>().unwrap())
    );
    let again = toml::to_string(&c).unwrap();
    assert_eq!(parse(&again, FILE).unwrap(), c);
}

#[test]
fn refuses_bad_coordinator_values() {
    let b = coordinator_base();
    refuse(
        &b.replace("name = \"dock-load\"\n", ""),
        "host.name",
        "coordinator",
    );
    refuse(
        &b.replace("address = \"10.99.99.1/24\"\n", ""),
        "host.address",
        "coordinator",
    );
    refuse(
        &b.replace("10.99.99.1/24", "10.98.0.1/24"),
        "host.address",
        "not inside the mesh",
    );
    refuse(
        &b.replace("mesh_cidr = \"10.99.99.0/24\"\n", ""),
        "coordinator.mesh_cidr",
        "is missing",
    );
    refuse(
        &b.replace("\"10.99.99.0/24\"", "\"10.99.99.1/24\""),
        "coordinator.mesh_cidr",
        "host bits",
    );
    refuse(
        &b.replace("[\"198.51.100.1:51871\"]", "[]"),
        "coordinator.public_endpoints",
        "at least one",
    );
    refuse(
        &b.replace("[\"198.51.100.1:51871\"]", "[\"vps.example.com:51871\"]"),
        "coordinator.public_endpoints[0]",
        "IP:port",
    );
    refuse(
        &b.replace("public_endpoints = [\"198.51.100.1:51871\"]\n", ""),
        "coordinator.public_endpoints",
        "is missing",
    );
    refuse(
        &format!("{b}api_port = 0\n"),
        "coordinator.api_port",
        "out of range; a port is 1 to 65535",
    );
    refuse(
        &format!("{b}keepalive_secs = 0\n"),
        "coordinator.keepalive_secs",
        "out of range; the keepalive is 1 to 65535 seconds",
    );
    refuse(
        &format!("{b}reserved = [\"10.99.99.1\"]\n"),
        "coordinator.reserved[0]",
        "prefix length",
    );
    refuse(
        &format!("{b}database = \"\"\n"),
        "coordinator.database",
        "empty",
    );
    refuse(
        &format!("{b}bogus = 1\n"),
        "coordinator.bogus",
        "unknown key",
    );
    let sa = |body: &str| {
        format!("{b}reserved = [\"10.99.99.240/28\"]\n\n[coordinator.static_assignments]\n{body}")
    };
    refuse(
        &sa("nas = \"10.98.0.2\"\n"),
        "coordinator.static_assignments.nas",
        "not inside the mesh",
    );
    refuse(
        &sa("nas = \"10.99.99.241\"\n"),
        "coordinator.static_assignments.nas",
        "reserved",
    );
    refuse(
        &sa("nas = \"10.99.99.0\"\n"),
        "coordinator.static_assignments.nas",
        "network or broadcast",
    );
    refuse(
        &sa("nas = \"10.99.99.2/32\"\n"),
        "coordinator.static_assignments.nas",
        "not an address",
    );
    refuse(
        &sa("nas = \"10.99.99.2\"\nbox = \"10.99.99.2\"\n"),
        "coordinator.static_assignments.box",
        "already assigned to \"nas\"",
    );
    refuse(
        &sa("nas = \"10.99.99.1\"\n"),
        "coordinator.static_assignments.nas",
        "own address",
    );
    refuse(
        &sa("dock-load = \"10.99.99.9\"\n"),
        "coordinator.static_assignments.dock-load",
        "own address",
    );
    refuse(
        &sa("Bad_Name = \"10.99.99.9\"\n"),
        "coordinator.static_assignments.Bad_Name",
        "lowercase",
    );
    parse(
        &sa("dock-load = \"10.99.99.1\"\nnas = \"10.99.99.20\"\n"),
        FILE,
    )
    .unwrap();
}

#[test]
fn routes_section_parses_and_defaults() {
    let c = parse(&base(), FILE).unwrap();
    assert_eq!(c.routes, RoutesConfig::default());
    assert_eq!(c.routes.nft_table, "meshd");
    let text = format!(
        "{}\n[routes]\nadvertise = [\"192.168.1.20/32\", \"fd00:1::/64\"]\nprotected = [\"10.42.0.0/16\", \"10.43.0.0/16\"]\nnft_table = \"meshd_lab\"\n",
        base()
    );
    let c = parse(&text, FILE).unwrap();
    let nets: Vec<String> = c.routes.advertise.iter().map(|n| n.to_string()).collect();
    assert_eq!(nets, vec!["192.168.1.20/32", "fd00:1::/64"]);
    assert_eq!(c.routes.protected.len(), 2);
    assert_eq!(c.routes.nft_table, "meshd_lab");
}

#[test]
fn routes_section_refusals_name_the_key() {
    let r = |body: &str| format!("{}\n[routes]\n{body}\n", base());
    refuse(&r("advertize = []"), "routes.advertize", "unknown key");
    refuse(
        &r("advertise = [\"192.168.1.20\"]"),
        "routes.advertise[0]",
        "/32",
    );
    refuse(
        &r("advertise = [\"192.168.1.0/16\"]"),
        "routes.advertise[0]",
        "host bits",
    );
    refuse(
        &r("advertise = [\"0.0.0.0/0\"]"),
        "routes.advertise[0]",
        "never a /0",
    );
    refuse(
        &r("advertise = [\"10.99.0.0/16\"]"),
        "routes.advertise[0]",
        "overlaps the mesh",
    );
    refuse(
        &r("advertise = [\"192.168.1.0/24\", \"192.168.1.20/32\"]"),
        "routes.advertise[1]",
        "overlaps 192.168.1.0/24",
    );
    refuse(
        &r("advertise = [\"10.42.0.0/24\"]\nprotected = [\"10.42.0.0/16\"]"),
        "routes.advertise[0]",
        "routes.protected 10.42.0.0/16",
    );
    refuse(
        &r("protected = [\"10.99.99.0/24\"]"),
        "routes.protected[0]",
        "overlaps the mesh",
    );
    refuse(
        &r("nft_table = \"bad name\""),
        "routes.nft_table",
        "not a table name",
    );
    refuse(
        &r("accept = [\"0.0.0.0/0\"]"),
        "routes.accept[0]",
        "default route",
    );
    refuse(
        &r("accept = [\"10.99.0.0/16\"]"),
        "routes.accept[0]",
        "overlaps the mesh",
    );
    refuse(
        &r("accept = [\"192.168.1.1/24\"]"),
        "routes.accept[0]",
        "host bits",
    );
    refuse(&r("accept = [\"banana\"]"), "routes.accept[0]", "");
    refuse(
        &r("accept = [\"10.42.0.0/24\"]\nprotected = [\"10.42.0.0/16\"]"),
        "routes.accept[0]",
        "routes.protected 10.42.0.0/16",
    );
    refuse(
        &r("advertise = [\"192.168.1.0/24\"]\naccept = [\"192.168.1.20/32\"]"),
        "routes.accept[0]",
        "routes.advertise 192.168.1.0/24",
    );
    let c = parse(&r("accept = [\"192.168.1.0/24\", \"fd00:1::/64\"]"), FILE).unwrap();
    assert_eq!(c.routes.accept.len(), 2);
    let peer_in_protected =
        base().replace("10.99.99.3/32\"]", "10.99.99.3/32\", \"10.42.5.0/24\"]");
    refuse(
        &format!("{peer_in_protected}\n[routes]\nprotected = [\"10.42.0.0/16\"]\n"),
        "peer \"dock-mirror\".allowed_ips[1]",
        "routes.protected 10.42.0.0/16",
    );
}

#[test]
fn dns_metrics_and_integrations_parse() {
    let c = parse(&base(), FILE).expect("base");
    assert_eq!(c.dns, ServiceConfig::dns_default());
    assert_eq!(c.metrics.listen_port, 51873);
    assert!(c.metrics.enable);
    assert_eq!(c.integrations, IntegrationsConfig::default());

    let text = format!(
        "{}\n[dns]\nlisten_port = 5353\n\n[metrics]\nenable = false\n\n\
         [integrations.k3s]\nrole = \"server\"\n\n[integrations.hosts]\n",
        base()
    );
    let c = parse(&text, FILE).expect("full");
    assert_eq!(
        c.dns,
        ServiceConfig {
            enable: true,
            listen_port: 5353,
            mesh_interface_only: true,
            loopback: false,
        }
    );
    assert!(!c.metrics.enable);
    assert!(c.metrics.mesh_interface_only);
    assert!(c.integrations.k3s.is_some());
    assert!(c.integrations.hosts.is_some());
    let c = parse(
        &format!("{}\n[metrics]\nmesh_interface_only = false\n", base()),
        FILE,
    )
    .expect("metrics off the mesh interface too");
    assert!(!c.metrics.mesh_interface_only);
    assert!(c.dns.mesh_interface_only);
    assert!(!c.metrics.loopback, "loopback is opt-in");
    let c = parse(&format!("{}\n[metrics]\nloopback = true\n", base()), FILE)
        .expect("metrics on loopback too");
    assert!(c.metrics.loopback);
    assert!(!c.dns.loopback);
}

#[test]
fn log_level_from_the_config() {
    let c = parse(&base(), FILE).expect("default");
    assert_eq!(c.daemon.log_level, LogLevel::Info);
    let c = parse(
        &format!("{}\n[daemon]\nlog_level = \"debug\"\n", base()),
        FILE,
    )
    .expect("debug");
    assert_eq!(c.daemon.log_level, LogLevel::Debug);
    refuse(
        &format!("{}\n[daemon]\nlog_level = \"loud\"\n", base()),
        "daemon.log_level",
        "\"loud\" is not a log level; use error, warn, info, debug or trace",
    );
}

#[test]
fn dns_metrics_and_integrations_refusals_name_the_key() {
    refuse(
        &format!("{}\n[dns]\nlisten_port = 0\n", base()),
        "dns.listen_port",
        "out of range",
    );
    refuse(
        &format!("{}\n[metrics]\nport = 1\n", base()),
        "metrics.port",
        "unknown key",
    );
    // Loopback is for /metrics only; mesh DNS does not offer it.
    refuse(
        &format!("{}\n[dns]\nloopback = true\n", base()),
        "dns.loopback",
        "unknown key",
    );
    refuse(
        &format!("{}\n[metrics]\nloopback = \"yes\"\n", base()),
        "metrics.loopback",
        "must be true or false",
    );
    refuse(
        &format!("{}\n[dns]\nmesh_interface_only = \"yes\"\n", base()),
        "dns.mesh_interface_only",
        "must be true or false, not the string \"yes\"",
    );
    refuse(
        &format!("{}\n[dns]\nlisten_port = 51873\n", base()),
        "metrics.listen_port",
        "different ports",
    );
    refuse(
        &format!(
            "{}\n[integrations.k3s]\nrole = \"server\"\nserver = \"x\"\n",
            base()
        ),
        "integrations.k3s.server",
        "only agents",
    );
    refuse(
        &format!("{}\n[integrations.nfs]\n", base()),
        "integrations.nfs",
        "unknown key `nfs` in integrations; the keys here are k3s, drbd",
    );
}

#[test]
fn rotate_every_days_defaults_to_30_and_is_ranged() {
    let base = "[host]\nname = \"dock-prod\"\n";
    let c = parse(base, "/etc/meshd/meshd.toml").expect("default");
    assert_eq!(c.daemon.rotate_every_days, DEFAULT_ROTATE_EVERY_DAYS);
    let c = parse(
        &format!("{base}[daemon]\nrotate_every_days = 0\n"),
        "/etc/meshd/meshd.toml",
    )
    .expect("never");
    assert_eq!(c.daemon.rotate_every_days, 0);
    let err = parse(
        &format!("{base}[daemon]\nrotate_every_days = 4000\n"),
        "/etc/meshd/meshd.toml",
    )
    .expect_err("too long");
    let msg = err.to_string();
    assert!(
        msg.contains("daemon.rotate_every_days")
            && msg.contains("out of range; the rotation period is 0 to 3650 days"),
        "{msg}"
    );
}

// ---- KNOWN_KEYS (config::keys) against the parser ----

/// `[name]` or `[[name]]`.
fn header(t: &KnownTable) -> String {
    if t.array {
        format!("[[{}]]", t.name)
    } else {
        format!("[{}]", t.name)
    }
}

/// A document with every table and every key of KNOWN_KEYS set to its example.
fn every_known_key() -> String {
    let mut text = String::new();
    for t in KNOWN_TABLES {
        text.push_str(&header(t));
        text.push('\n');
        for k in keys::keys_of(t.name).filter(|k| k.kind != "table") {
            let key = if k.key == "NAME" { "dock-prod" } else { k.key };
            text.push_str(&format!("{key} = {}\n", k.example));
        }
        text.push('\n');
    }
    text
}

#[test]
fn known_keys_are_the_keys_the_parser_accepts() {
    let text = every_known_key();
    let _ = reader::accepted::take();
    let result = parse(&text, FILE);
    let accepted = reader::accepted::take();
    if let Err(errors) = &result {
        let unknown: Vec<String> = errors
            .errors
            .iter()
            .filter(|e| e.message.contains("unknown key"))
            .map(|e| e.to_string())
            .collect();
        assert!(
            unknown.is_empty(),
            "KNOWN_KEYS has keys the parser refuses: {unknown:#?}"
        );
    }
    let mut known: BTreeSet<(String, String)> = KNOWN_KEYS
        .iter()
        .filter(|k| k.key != "NAME")
        .map(|k| (k.table.to_string(), k.key.to_string()))
        .collect();
    for t in KNOWN_TABLES {
        // `integrations.k3s`: the root has `integrations`, `integrations` has `k3s`.
        let parts: Vec<&str> = t.name.split('.').collect();
        for i in 0..parts.len() {
            known.insert((parts[..i].join("."), parts[i].to_string()));
        }
    }
    // Tables whose keys are names, not a fixed set (static_assignments), declare none.
    let undocumented: Vec<_> = accepted.difference(&known).collect();
    assert!(
        undocumented.is_empty(),
        "the parser accepts keys KNOWN_KEYS does not document: {undocumented:?}"
    );
    let unaccepted: Vec<_> = known.difference(&accepted).collect();
    assert!(
        unaccepted.is_empty(),
        "KNOWN_KEYS documents keys the parser does not declare: {unaccepted:?}"
    );
    // Every table and key in the order of KNOWN_TABLES, and each table documented once.
    let mut order = KNOWN_TABLES.iter().map(|t| t.name);
    let mut current = order.next();
    for k in KNOWN_KEYS {
        while current != Some(k.table) {
            current = order.next();
            assert!(
                current.is_some(),
                "{}.{} is out of table order",
                k.table,
                k.key
            );
        }
    }
}

#[test]
fn the_example_of_every_known_key_is_valid_together() {
    if let Err(e) = parse(&every_known_key(), FILE) {
        panic!("{e}\n{}", every_known_key());
    }
}

#[test]
fn known_tables_minimal_bodies_parse() {
    for t in KNOWN_TABLES {
        let text = format!("{}\n{}\n", header(t), t.minimal);
        if let Err(e) = parse(&text, FILE) {
            panic!("{}: {e}\n{text}", t.name);
        }
    }
}

#[test]
fn known_defaults_are_the_parsers() {
    let mut checked = 0;
    for t in KNOWN_TABLES {
        let without = format!("{}\n{}\n", header(t), t.minimal);
        let expected = parse(&without, FILE).expect("minimal parses");
        for k in keys::keys_of(t.name) {
            let KeyDefault::Value(v) = k.default else {
                continue;
            };
            let with = format!("{}\n{} = {v}\n{}\n", header(t), k.key, t.minimal);
            let got = parse(&with, FILE).unwrap_or_else(|e| panic!("{}.{}: {e}", t.name, k.key));
            assert_eq!(
                got, expected,
                "{}.{}: {v} is not the parser's default",
                t.name, k.key
            );
            checked += 1;
        }
    }
    assert!(checked > 20, "only {checked} defaults checked");
}
