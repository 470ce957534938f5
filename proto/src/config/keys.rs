//! Every table and key of `meshd.toml`, with its type, default and meaning: the one source of
//! the commented conffile the package installs (`/etc/meshd/meshd.toml`) and of the
//! `meshd.toml(5)` man page, both rendered by `meshd-docgen`. Tests hold it to the parser:
//! every key the parser accepts is here and every key here is accepted
//! (`config::tests::known_keys_are_the_keys_the_parser_accepts`), and every literal default
//! is the parser's (`config::tests::known_defaults_are_the_parsers`).

/// One table of the file (`[host]`, or an array of tables such as `[[peer]]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KnownTable {
    /// Its dotted name: `host`, `integrations.k3s`.
    pub name: &'static str,
    /// `[[name]]`: may appear several times.
    pub array: bool,
    /// What it is for (plain text, sentences).
    pub meaning: &'static str,
    /// The smallest valid body of the table (TOML, may be empty), with anything else the file
    /// needs for it: the tests parse it with and without each default.
    pub minimal: &'static str,
}

/// A key's default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyDefault {
    /// No default: the key is required (`required` says when), or absent means "none".
    None,
    /// This TOML value (tested to be the parser's default).
    Value(&'static str),
    /// A default that depends on other settings, in words.
    Words(&'static str),
}

/// One key of a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KnownKey {
    /// The table's dotted name (as in [`KnownTable::name`]).
    pub table: &'static str,
    pub key: &'static str,
    /// Its type, in words: `string`, `path`, `integer`, `boolean`, `list of prefixes`, ...
    pub kind: &'static str,
    pub default: KeyDefault,
    /// A value to show (TOML): the default where there is one, else a typical value.
    pub example: &'static str,
    /// When it must be set (`None`: optional).
    pub required: Option<&'static str>,
    /// What it does (plain text, sentences).
    pub meaning: &'static str,
}

/// The tables, in the order of the file and the page.
pub const KNOWN_TABLES: &[KnownTable] = &[
    KnownTable {
        name: "host",
        array: false,
        meaning: "This host in the mesh: its name, its mesh address and its WireGuard interface. \
                  A host that joins with a token learns its name and address from the token.",
        minimal: "",
    },
    KnownTable {
        name: "daemon",
        array: false,
        meaning: "How meshd itself runs: its control socket, the WireGuard implementation, its \
                  state directory, key rotation.",
        minimal: "",
    },
    KnownTable {
        name: "coordinator",
        array: false,
        meaning: "Present only on the one host that runs the coordinator: it hands out mesh \
                  addresses, keeps the registry of hosts and sends every host its netmap.",
        minimal: "mesh_cidr = \"10.99.99.0/24\"\npublic_endpoints = [\"198.51.100.1:51871\"]\n\
                  [host]\nname = \"dock-load\"\naddress = \"10.99.99.1/24\"",
    },
    KnownTable {
        name: "coordinator.static_assignments",
        array: false,
        meaning: "Fixed addresses: one NAME = \"ADDRESS\" line per host, each inside mesh_cidr, \
                  not reserved, and unique.",
        minimal: "[coordinator]\nmesh_cidr = \"10.99.99.0/24\"\n\
                  public_endpoints = [\"198.51.100.1:51871\"]\n\
                  [host]\nname = \"dock-load\"\naddress = \"10.99.99.1/24\"",
    },
    KnownTable {
        name: "routes",
        array: false,
        meaning: "Subnets routed over the mesh and the ones it must never carry.",
        minimal: "",
    },
    KnownTable {
        name: "dns",
        array: false,
        meaning: "Mesh DNS: NAME.mesh.internal answered on this host's mesh address.",
        minimal: "",
    },
    KnownTable {
        name: "metrics",
        array: false,
        meaning: "Prometheus metrics: /metrics served over HTTP on this host's mesh address.",
        minimal: "",
    },
    KnownTable {
        name: "integrations.k3s",
        array: false,
        meaning: "A K3s configuration drop-in that puts the node on its mesh address \
                  (node-ip) and flannel on the mesh interface (flannel-iface).",
        minimal: "role = \"server\"",
    },
    KnownTable {
        name: "integrations.drbd",
        array: true,
        meaning: "One DRBD resource file per entry, its hosts at their mesh addresses.",
        minimal: "resource = \"r0\"\nhosts = [\"dock-prod\", \"dock-mirror\"]\n\
                  disk = \"/dev/vg0/r0\"",
    },
    KnownTable {
        name: "integrations.prometheus",
        array: false,
        meaning: "A Prometheus file_sd file listing every host's metrics endpoint.",
        minimal: "",
    },
    KnownTable {
        name: "integrations.hosts",
        array: false,
        meaning: "A block between # BEGIN meshd and # END meshd in /etc/hosts with every \
                  host's mesh name and address.",
        minimal: "",
    },
    KnownTable {
        name: "integrations.template",
        array: true,
        meaning: "A file of your own, rendered from a minijinja template with the mesh as its \
                  context.",
        minimal: "source = \"/etc/meshd/haproxy.cfg.j2\"\npath = \"/etc/haproxy/conf.d/mesh.cfg\"",
    },
    KnownTable {
        name: "peer",
        array: true,
        meaning: "A static peer, for a mesh without a coordinator.",
        minimal: "name = \"dock-prod\"\n\
                  public_key = \"AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=\"\n\
                  allowed_ips = [\"10.99.99.2/32\"]\n\
                  [host]\nname = \"dock-load\"\naddress = \"10.99.99.1/24\"",
    },
];

const CHECK: &str = "A command (program and arguments, no shell) run after the file is \
                     written and before reload; if it fails, the previous file is put back.";
const RELOAD: &str = "A command (program and arguments, no shell) run when the file changed.";

/// Every key, table by table in [`KNOWN_TABLES`] order.
pub const KNOWN_KEYS: &[KnownKey] = &[
    // [host]
    KnownKey {
        table: "host",
        key: "name",
        kind: "string",
        default: KeyDefault::None,
        example: "\"dock-load\"",
        required: Some("on the coordinator and with static [[peer]] entries"),
        meaning: "This host's name in the mesh (a DNS label: a-z, 0-9 and -, at most 63 \
                  characters).",
    },
    KnownKey {
        table: "host",
        key: "address",
        kind: "prefix",
        default: KeyDefault::None,
        example: "\"10.99.99.1/24\"",
        required: Some("on the coordinator and with static [[peer]] entries"),
        meaning: "This host's mesh address and the mesh prefix length.",
    },
    KnownKey {
        table: "host",
        key: "interface",
        kind: "string",
        default: KeyDefault::Value("\"wgmesh0\""),
        example: "\"wgmesh0\"",
        required: None,
        meaning: "The WireGuard interface meshd owns; distinct from flannel-wg and wg0. \
                  Changing it needs a restart of meshd.",
    },
    KnownKey {
        table: "host",
        key: "listen_port",
        kind: "integer",
        default: KeyDefault::Value("51871"),
        example: "51871",
        required: None,
        meaning: "WireGuard's UDP port; not 51820/51821 (flannel, Kilo) nor 8472 (VXLAN).",
    },
    KnownKey {
        table: "host",
        key: "private_key_file",
        kind: "path",
        default: KeyDefault::Value("\"/etc/meshd/private.key\""),
        example: "\"/etc/meshd/private.key\"",
        required: None,
        meaning: "This host's WireGuard private key; created with mode 0600 at first start.",
    },
    KnownKey {
        table: "host",
        key: "mtu",
        kind: "integer",
        default: KeyDefault::Value("1420"),
        example: "1420",
        required: None,
        meaning: "The interface's MTU, 1280 to 9000 (1420: a 1500-byte underlay less \
                  WireGuard's 80).",
    },
    // [daemon]
    KnownKey {
        table: "daemon",
        key: "control_socket",
        kind: "path",
        default: KeyDefault::Value("\"/run/meshd/meshd.sock\""),
        example: "\"/run/meshd/meshd.sock\"",
        required: None,
        meaning: "The socket meshctl talks to. Changing it needs a restart of meshd.",
    },
    KnownKey {
        table: "daemon",
        key: "backend",
        kind: "string",
        default: KeyDefault::Value("\"auto\""),
        example: "\"auto\"",
        required: None,
        meaning: "The WireGuard implementation: auto (kernel WireGuard if a WireGuard link can \
                  be created, else meshd-wg), kernel or userspace.",
    },
    KnownKey {
        table: "daemon",
        key: "engine_command",
        kind: "path",
        default: KeyDefault::Words("meshd-wg next to meshd, else from PATH"),
        example: "\"/usr/bin/meshd-wg\"",
        required: None,
        meaning: "The userspace engine (meshd-wg, or wireguard-go).",
    },
    KnownKey {
        table: "daemon",
        key: "reconcile_interval_secs",
        kind: "integer",
        default: KeyDefault::Value("10"),
        example: "10",
        required: None,
        meaning: "Seconds between passes that compare the interface, routes and firewall with \
                  what they should be (1 to 3600).",
    },
    KnownKey {
        table: "daemon",
        key: "state_dir",
        kind: "path",
        default: KeyDefault::Value("\"/var/lib/meshd\""),
        example: "\"/var/lib/meshd\"",
        required: None,
        meaning: "Membership, the cached netmap and the endpoints learned per peer (tried first after a restart).",
    },
    KnownKey {
        table: "daemon",
        key: "join_token_file",
        kind: "path",
        default: KeyDefault::None,
        example: "\"/etc/meshd/join.token\"",
        required: None,
        meaning: "Join with the token in this file at first start (unattended installs); the \
                  file must be owned by root and readable by root only (mode 0600), and is \
                  removed once the join succeeded.",
    },
    KnownKey {
        table: "daemon",
        key: "rotate_every_days",
        kind: "integer",
        default: KeyDefault::Value("30"),
        example: "30",
        required: None,
        meaning: "Rotate this host's WireGuard key this many days after it was created, a few \
                  percent early by a per-host jitter (0: never; at most 3650).",
    },
    KnownKey {
        table: "daemon",
        key: "log_level",
        kind: "string",
        default: KeyDefault::Value("\"info\""),
        example: "\"debug\"",
        required: None,
        meaning: "What meshd logs: error, warn, info, debug or trace. meshd --log-level and \
                  RUST_LOG win over it. Read at start (a reload does not change it).",
    },
    // [coordinator]
    KnownKey {
        table: "coordinator",
        key: "mesh_cidr",
        kind: "prefix",
        default: KeyDefault::None,
        example: "\"10.99.99.0/24\"",
        required: Some("always"),
        meaning: "The prefix mesh addresses are handed out of (host bits zero; contains \
                  host.address).",
    },
    KnownKey {
        table: "coordinator",
        key: "api_port",
        kind: "integer",
        default: KeyDefault::Value("51872"),
        example: "51872",
        required: None,
        meaning: "TCP port of the coordinator's API on its mesh address.",
    },
    KnownKey {
        table: "coordinator",
        key: "public_endpoints",
        kind: "list of IP:port",
        default: KeyDefault::None,
        example: "[\"198.51.100.1:51871\"]",
        required: Some("always"),
        meaning: "Where other hosts reach this one (non-empty); invitation tokens carry them.",
    },
    KnownKey {
        table: "coordinator",
        key: "reserved",
        kind: "list of prefixes",
        default: KeyDefault::Value("[]"),
        example: "[\"10.99.99.0/28\"]",
        required: None,
        meaning: "Addresses never handed out, automatically or on request.",
    },
    KnownKey {
        table: "coordinator",
        key: "keepalive_secs",
        kind: "integer",
        default: KeyDefault::Value("25"),
        example: "25",
        required: None,
        meaning: "Persistent keepalive (seconds, 1 to 65535) toward peers from hosts behind NAT.",
    },
    KnownKey {
        table: "coordinator",
        key: "static_assignments",
        kind: "table",
        default: KeyDefault::None,
        example: "{ dock-prod = \"10.99.99.20\" }",
        required: None,
        meaning: "Fixed addresses by host name; see [coordinator.static_assignments].",
    },
    KnownKey {
        table: "coordinator",
        key: "database",
        kind: "path",
        default: KeyDefault::Value("\"/var/lib/meshd/coordinator.db\""),
        example: "\"/var/lib/meshd/coordinator.db\"",
        required: None,
        meaning: "The registry of hosts (SQLite).",
    },
    // [coordinator.static_assignments]
    KnownKey {
        table: "coordinator.static_assignments",
        key: "NAME",
        kind: "address",
        default: KeyDefault::None,
        example: "\"10.99.99.20\"",
        required: None,
        meaning: "The address of host NAME (no prefix length).",
    },
    // [routes]
    KnownKey {
        table: "routes",
        key: "advertise",
        kind: "list of prefixes",
        default: KeyDefault::Value("[]"),
        example: "[\"192.168.1.20/32\"]",
        required: None,
        meaning: "Subnets this host forwards for the mesh (with forwarding and masquerade); an \
                  admin approves them on the coordinator (meshctl routes approve).",
    },
    KnownKey {
        table: "routes",
        key: "protected",
        kind: "list of prefixes",
        default: KeyDefault::Value("[]"),
        example: "[\"10.42.0.0/16\", \"10.43.0.0/16\"]",
        required: None,
        meaning: "Never routed over the mesh (K3s pods and services): routes overlapping them \
                  are refused.",
    },
    KnownKey {
        table: "routes",
        key: "accept",
        kind: "list of prefixes",
        default: KeyDefault::Value("[]"),
        example: "[\"192.168.50.0/24\"]",
        required: None,
        meaning: "The peers' approved prefixes this host takes: each must lie inside one of \
                  these.",
    },
    KnownKey {
        table: "routes",
        key: "nft_table",
        kind: "string",
        default: KeyDefault::Value("\"meshd\""),
        example: "\"meshd\"",
        required: None,
        meaning: "meshd's nftables table (family inet).",
    },
    // [dns]
    KnownKey {
        table: "dns",
        key: "enable",
        kind: "boolean",
        default: KeyDefault::Value("true"),
        example: "true",
        required: None,
        meaning: "Serve mesh DNS.",
    },
    KnownKey {
        table: "dns",
        key: "listen_port",
        kind: "integer",
        default: KeyDefault::Value("53"),
        example: "53",
        required: None,
        meaning: "Its port (UDP and TCP).",
    },
    KnownKey {
        table: "dns",
        key: "mesh_interface_only",
        kind: "boolean",
        default: KeyDefault::Value("true"),
        example: "true",
        required: None,
        meaning: "Answer only what arrives over the mesh interface (and this host's own \
                  processes); false: also the mesh address reached over other interfaces.",
    },
    // [metrics]
    KnownKey {
        table: "metrics",
        key: "enable",
        kind: "boolean",
        default: KeyDefault::Value("true"),
        example: "true",
        required: None,
        meaning: "Serve /metrics.",
    },
    KnownKey {
        table: "metrics",
        key: "listen_port",
        kind: "integer",
        default: KeyDefault::Value("51873"),
        example: "51873",
        required: None,
        meaning: "Its TCP port; not dns.listen_port, and not 9586 (the WireGuard exporter's, which may run beside meshd).",
    },
    KnownKey {
        table: "metrics",
        key: "mesh_interface_only",
        kind: "boolean",
        default: KeyDefault::Value("true"),
        example: "true",
        required: None,
        meaning: "As for [dns].",
    },
    KnownKey {
        table: "metrics",
        key: "loopback",
        kind: "boolean",
        default: KeyDefault::Value("false"),
        example: "true",
        required: None,
        meaning: "Also serve 127.0.0.1:listen_port, for a Prometheus or agent on this host. Every local user can read /metrics then (peer names, keys, traffic).",
    },
    // [integrations.k3s]
    KnownKey {
        table: "integrations.k3s",
        key: "role",
        kind: "string",
        default: KeyDefault::Words("agent when server is set"),
        example: "\"agent\"",
        required: Some("unless server is set"),
        meaning: "server, or agent (with server).",
    },
    KnownKey {
        table: "integrations.k3s",
        key: "server",
        kind: "string",
        default: KeyDefault::None,
        example: "\"dock-load\"",
        required: Some("on an agent"),
        meaning: "On an agent: the mesh name of the K3s server.",
    },
    KnownKey {
        table: "integrations.k3s",
        key: "path",
        kind: "path",
        default: KeyDefault::Value("\"/etc/rancher/k3s/config.yaml.d/90-meshd.yaml\""),
        example: "\"/etc/rancher/k3s/config.yaml.d/90-meshd.yaml\"",
        required: None,
        meaning: "The drop-in meshd writes; never K3s's config.yaml itself.",
    },
    KnownKey {
        table: "integrations.k3s",
        key: "flannel_iface",
        kind: "string",
        default: KeyDefault::Words("the mesh interface"),
        example: "\"wgmesh0\"",
        required: None,
        meaning: "The interface flannel uses.",
    },
    KnownKey {
        table: "integrations.k3s",
        key: "check",
        kind: "list of strings",
        default: KeyDefault::None,
        example: "[\"k3s\", \"check-config\"]",
        required: None,
        meaning: CHECK,
    },
    KnownKey {
        table: "integrations.k3s",
        key: "reload",
        kind: "list of strings",
        default: KeyDefault::None,
        example: "[\"systemctl\", \"restart\", \"k3s\"]",
        required: None,
        meaning: RELOAD,
    },
    // [[integrations.drbd]]
    KnownKey {
        table: "integrations.drbd",
        key: "resource",
        kind: "string",
        default: KeyDefault::None,
        example: "\"r0\"",
        required: Some("always"),
        meaning: "The DRBD resource (letters, digits, _ and -).",
    },
    KnownKey {
        table: "integrations.drbd",
        key: "hosts",
        kind: "list of strings",
        default: KeyDefault::None,
        example: "[\"dock-prod\", \"dock-mirror\"]",
        required: Some("always"),
        meaning: "Its hosts' mesh names; a host's node-id is its position in the list (keep \
                  the order when adding hosts).",
    },
    KnownKey {
        table: "integrations.drbd",
        key: "port",
        kind: "integer",
        default: KeyDefault::Words("7788 plus the entry's index"),
        example: "7788",
        required: None,
        meaning: "The resource's TCP port.",
    },
    KnownKey {
        table: "integrations.drbd",
        key: "path",
        kind: "path",
        default: KeyDefault::Words("/etc/drbd.d/RESOURCE.res"),
        example: "\"/etc/drbd.d/r0.res\"",
        required: None,
        meaning: "The resource file meshd writes.",
    },
    KnownKey {
        table: "integrations.drbd",
        key: "device",
        kind: "string",
        default: KeyDefault::Words("/dev/drbdMINOR"),
        example: "\"/dev/drbd0\"",
        required: None,
        meaning: "The DRBD device.",
    },
    KnownKey {
        table: "integrations.drbd",
        key: "minor",
        kind: "integer",
        default: KeyDefault::Words("the entry's index"),
        example: "0",
        required: None,
        meaning: "The device's minor number.",
    },
    KnownKey {
        table: "integrations.drbd",
        key: "disk",
        kind: "string",
        default: KeyDefault::None,
        example: "\"/dev/vg0/r0\"",
        required: Some("unless template is set"),
        meaning: "The backing disk.",
    },
    KnownKey {
        table: "integrations.drbd",
        key: "meta_disk",
        kind: "string",
        default: KeyDefault::Value("\"internal\""),
        example: "\"internal\"",
        required: None,
        meaning: "Where DRBD keeps its metadata.",
    },
    KnownKey {
        table: "integrations.drbd",
        key: "template",
        kind: "path",
        default: KeyDefault::None,
        example: "\"/etc/meshd/r0.res.j2\"",
        required: None,
        meaning: "A minijinja template to render instead of the built-in resource file.",
    },
    KnownKey {
        table: "integrations.drbd",
        key: "drbdadm",
        kind: "string",
        default: KeyDefault::Value("\"drbdadm\""),
        example: "\"drbdadm\"",
        required: None,
        meaning: "The drbdadm program: check runs drbdadm -d adjust RESOURCE and reload runs \
                  drbdadm adjust RESOURCE, unless check or reload are given.",
    },
    KnownKey {
        table: "integrations.drbd",
        key: "check",
        kind: "list of strings",
        default: KeyDefault::Words("drbdadm -d adjust RESOURCE"),
        example: "[\"drbdadm\", \"-d\", \"adjust\", \"r0\"]",
        required: None,
        meaning: CHECK,
    },
    KnownKey {
        table: "integrations.drbd",
        key: "reload",
        kind: "list of strings",
        default: KeyDefault::Words("drbdadm adjust RESOURCE"),
        example: "[\"drbdadm\", \"adjust\", \"r0\"]",
        required: None,
        meaning: RELOAD,
    },
    // [integrations.prometheus]
    KnownKey {
        table: "integrations.prometheus",
        key: "enable",
        kind: "boolean",
        default: KeyDefault::Value("true"),
        example: "true",
        required: None,
        meaning: "false: write no file (as if the table were absent).",
    },
    KnownKey {
        table: "integrations.prometheus",
        key: "path",
        kind: "path",
        default: KeyDefault::Value("\"/etc/prometheus/file_sd/meshd.json\""),
        example: "\"/etc/prometheus/file_sd/meshd.json\"",
        required: None,
        meaning: "The file_sd JSON file; Prometheus re-reads it by itself.",
    },
    KnownKey {
        table: "integrations.prometheus",
        key: "check",
        kind: "list of strings",
        default: KeyDefault::None,
        example: "[\"promtool\", \"check\", \"config\", \"/etc/prometheus/prometheus.yml\"]",
        required: None,
        meaning: CHECK,
    },
    KnownKey {
        table: "integrations.prometheus",
        key: "reload",
        kind: "list of strings",
        default: KeyDefault::None,
        example: "[\"systemctl\", \"reload\", \"prometheus\"]",
        required: None,
        meaning: RELOAD,
    },
    // [integrations.hosts]
    KnownKey {
        table: "integrations.hosts",
        key: "enable",
        kind: "boolean",
        default: KeyDefault::Value("true"),
        example: "true",
        required: None,
        meaning: "false: write no block (as if the table were absent).",
    },
    KnownKey {
        table: "integrations.hosts",
        key: "path",
        kind: "path",
        default: KeyDefault::Value("\"/etc/hosts\""),
        example: "\"/etc/hosts\"",
        required: None,
        meaning: "The hosts file.",
    },
    KnownKey {
        table: "integrations.hosts",
        key: "check",
        kind: "list of strings",
        default: KeyDefault::None,
        example: "[\"getent\", \"hosts\", \"localhost\"]",
        required: None,
        meaning: CHECK,
    },
    KnownKey {
        table: "integrations.hosts",
        key: "reload",
        kind: "list of strings",
        default: KeyDefault::None,
        example: "[\"systemctl\", \"reload\", \"dnsmasq\"]",
        required: None,
        meaning: RELOAD,
    },
    // [[integrations.template]]
    KnownKey {
        table: "integrations.template",
        key: "name",
        kind: "string",
        default: KeyDefault::Words("the path"),
        example: "\"haproxy\"",
        required: None,
        meaning: "Its name in meshctl status and meshctl doctor.",
    },
    KnownKey {
        table: "integrations.template",
        key: "source",
        kind: "path",
        default: KeyDefault::None,
        example: "\"/etc/meshd/haproxy.cfg.j2\"",
        required: Some("always"),
        meaning: "The minijinja template (an absolute path).",
    },
    KnownKey {
        table: "integrations.template",
        key: "path",
        kind: "path",
        default: KeyDefault::None,
        example: "\"/etc/haproxy/conf.d/mesh.cfg\"",
        required: Some("always"),
        meaning: "The file meshd writes.",
    },
    KnownKey {
        table: "integrations.template",
        key: "check",
        kind: "list of strings",
        default: KeyDefault::None,
        example: "[\"haproxy\", \"-c\", \"-f\", \"/etc/haproxy/haproxy.cfg\"]",
        required: None,
        meaning: CHECK,
    },
    KnownKey {
        table: "integrations.template",
        key: "reload",
        kind: "list of strings",
        default: KeyDefault::None,
        example: "[\"systemctl\", \"reload\", \"haproxy\"]",
        required: None,
        meaning: RELOAD,
    },
    // [[peer]]
    KnownKey {
        table: "peer",
        key: "name",
        kind: "string",
        default: KeyDefault::None,
        example: "\"dock-prod\"",
        required: Some("always"),
        meaning: "The peer's name (a DNS label), unique among the peers.",
    },
    KnownKey {
        table: "peer",
        key: "public_key",
        kind: "string",
        default: KeyDefault::None,
        example: "\"AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=\"",
        required: Some("always"),
        meaning: "Its WireGuard public key (base64, as wg pubkey prints it).",
    },
    KnownKey {
        table: "peer",
        key: "endpoint",
        kind: "IP:port",
        default: KeyDefault::None,
        example: "\"198.51.100.2:51871\"",
        required: None,
        meaning: "Where to reach it (an address, not a name); leave it out for peers behind NAT.",
    },
    KnownKey {
        table: "peer",
        key: "allowed_ips",
        kind: "list of prefixes",
        default: KeyDefault::None,
        example: "[\"10.99.99.2/32\"]",
        required: Some("always"),
        meaning: "The addresses routed to it (host bits zero; no overlap between peers).",
    },
    KnownKey {
        table: "peer",
        key: "persistent_keepalive",
        kind: "integer",
        default: KeyDefault::None,
        example: "25",
        required: None,
        meaning: "Seconds between keepalives, on hosts behind NAT (0: off).",
    },
];

/// The keys of `table`, in order.
pub fn keys_of(table: &str) -> impl Iterator<Item = &'static KnownKey> + '_ {
    KNOWN_KEYS.iter().filter(move |k| k.table == table)
}
