//! Golden tests of configuration error messages: the exact text an operator, an editor or CI
//! sees for representative mistakes (`FILE:LINE:COL: KEY: message`, the source line and the
//! caret), several errors of one file at once, a syntax error alone.

use mesh_proto::config;

const FILE: &str = "/etc/meshd/meshd.toml";

fn key() -> String {
    mesh_proto::PublicKey([7; 32]).to_string()
}

fn refused(text: &str) -> String {
    config::parse(text, FILE)
        .expect_err("the configuration must be refused")
        .to_string()
}

#[test]
fn endpoint_port_out_of_range_names_the_peer() {
    let text = format!(
        "[host]\nname = \"dock-load\"\naddress = \"10.99.99.1/24\"\n\n[[peer]]\nname = \
         \"nas\"\npublic_key = \"{}\"\nendpoint = \"192.168.1.20:99999\"\nallowed_ips = \
         [\"10.99.99.20/32\"]\n",
        key()
    );
    assert_eq!(
        refused(&text),
        r#"/etc/meshd/meshd.toml:8:12: peer "nas".endpoint: port 99999 is out of range; a port is 1 to 65535
  |
8 | endpoint = "192.168.1.20:99999"
  |            ^"#
    );
}

#[test]
fn a_string_where_a_list_is_needed() {
    let text = "[integrations.k3s]\nrole = \"server\"\nreload = \"systemctl restart k3s\"\n";
    assert_eq!(
        refused(text),
        r#"/etc/meshd/meshd.toml:3:10: integrations.k3s.reload: must be a list of strings, e.g. reload = ["systemctl", "restart", "k3s"], not the string "systemctl restart k3s"
  |
3 | reload = "systemctl restart k3s"
  |          ^"#
    );
}

#[test]
fn every_error_of_the_file_at_once() {
    let text = format!(
        "[host]\nname = \"dock-load\"\naddress = \"10.99.99.1/24\"\nmtu = 100\nlisten_port = \
         \"51871\"\n\n[[peer]]\nname = \"nas\"\npublic_key = \"{}\"\nallowed_ips = \
         \"10.99.99.20/32\"\nkeepalive = 25\n\n[[peer]]\npublic_key = \"nope\"\nallowed_ips = \
         [\"10.99.99.21/32\", 7]\n",
        key()
    );
    let errors = config::parse(&text, FILE).expect_err("refused");
    assert_eq!(errors.len(), 7, "{errors}");
    assert_eq!(
        errors.to_string(),
        r#"/etc/meshd/meshd.toml:4:7: host.mtu: 100 is out of range; the MTU is 1280 to 9000 (IPv6 needs at least 1280; WireGuard over a 1500 underlay is 1420)
  |
4 | mtu = 100
  |       ^

/etc/meshd/meshd.toml:5:15: host.listen_port: must be a whole number without quotes: listen_port = 51871
  |
5 | listen_port = "51871"
  |               ^

/etc/meshd/meshd.toml:10:15: peer "nas".allowed_ips: must be a list of strings, e.g. allowed_ips = ["10.99.99.20/32"], not the string "10.99.99.20/32"
   |
10 | allowed_ips = "10.99.99.20/32"
   |               ^

/etc/meshd/meshd.toml:11:1: peer "nas".keepalive: unknown key `keepalive` in peer "nas"; the keys here are name, public_key, endpoint, allowed_ips, persistent_keepalive
   |
11 | keepalive = 25
   | ^

/etc/meshd/meshd.toml:13:1: peer[1].name: is missing; each [[peer]] needs a name (a DNS label), e.g. name = "nas"
   |
13 | [[peer]]
   | ^

/etc/meshd/meshd.toml:14:14: peer[1].public_key: "nope" is not a WireGuard public key; expected 44 characters of base64 as printed by `wg pubkey`
   |
14 | public_key = "nope"
   |              ^

/etc/meshd/meshd.toml:15:34: peer[1].allowed_ips[1]: must be a string in double quotes (every element of allowed_ips is), not the number 7
   |
15 | allowed_ips = ["10.99.99.21/32", 7]
   |                                  ^

7 errors in /etc/meshd/meshd.toml"#
    );
    // The machine-readable form: one `FILE:LINE:COL:` line per error.
    let lines: Vec<String> = errors.iter().map(|e| e.one_line()).collect();
    assert_eq!(lines[0], "/etc/meshd/meshd.toml:4:7: host.mtu: 100 is out of range; the MTU is 1280 to 9000 (IPv6 needs at least 1280; WireGuard over a 1500 underlay is 1420)");
    assert_eq!(errors.one_line().lines().count(), 7);
}

#[test]
fn a_syntax_error_is_one_error_at_its_place() {
    let text = "[host]\nname = \"dock-load\"\naddress = 10.99.99.1/24\n\n[daemon]\nbackend = 3\n";
    let errors = config::parse(text, FILE).expect_err("refused");
    assert_eq!(errors.len(), 1);
    assert_eq!(
        errors.to_string(),
        r#"/etc/meshd/meshd.toml:3:16: host.address: not valid TOML: expected newline, `#`
  |
3 | address = 10.99.99.1/24
  |                ^"#
    );
}

#[test]
fn wrong_types_in_plain_words() {
    let text =
        "peer = 3\n[dns]\nlisten_port = 70000\nenable = \"yes\"\n[metrics]\nlisten_port = 95.86\n";
    assert_eq!(
        config::parse(text, FILE)
            .expect_err("refused")
            .one_line(),
        "/etc/meshd/meshd.toml:1:8: peer: must be a list of tables, each starting with a [[peer]] line
/etc/meshd/meshd.toml:3:15: dns.listen_port: 70000 is out of range; a port is 1 to 65535
/etc/meshd/meshd.toml:4:10: dns.enable: must be true or false, not the string \"yes\"
/etc/meshd/meshd.toml:6:15: metrics.listen_port: must be a whole number, not the number 95.86"
    );
}

#[test]
fn a_missing_requirement_without_a_place_has_no_location() {
    // [coordinator] requires host.name; there is no [host] to point at.
    let text = "[coordinator]\nmesh_cidr = \"10.99.99.0/24\"\npublic_endpoints = \
                [\"198.51.100.1:51871\"]\n";
    let errors = config::parse(text, FILE).expect_err("refused");
    let lines: Vec<String> = errors.iter().map(|e| e.one_line()).collect();
    assert_eq!(
        lines,
        [
            "/etc/meshd/meshd.toml: host.name: is missing: this host's name is required on the \
             coordinator ([coordinator] is present), e.g. name = \"dock-load\"; only a host that \
             joins with a token may leave it out",
            "/etc/meshd/meshd.toml: host.address: is missing: this host's mesh address is \
             required on the coordinator ([coordinator] is present), e.g. address = \
             \"10.99.99.1/24\"; only a host that joins with a token may leave it out",
        ]
    );
}
