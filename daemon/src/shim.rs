//! TEMPORARY stand-ins for mesh_proto::config and mesh_proto::control until they land.
#![allow(dead_code, missing_docs)]
pub mod config {
    use ipnet::IpNet;
    use mesh_proto::PublicKey;
    use std::net::SocketAddr;
    use std::path::{Path, PathBuf};
    pub struct Config {
        pub host: Host,
        pub daemon: Daemon,
        pub peers: Vec<Peer>,
    }
    pub struct Host {
        pub name: String,
        pub address: IpNet,
        pub interface: String,
        pub listen_port: u16,
        pub private_key_file: PathBuf,
        pub mtu: u16,
    }
    pub struct Daemon {
        pub control_socket: PathBuf,
        pub engine_command: Option<PathBuf>,
        pub reconcile_interval_secs: u64,
    }
    pub struct Peer {
        pub name: String,
        pub public_key: PublicKey,
        pub endpoint: Option<SocketAddr>,
        pub allowed_ips: Vec<IpNet>,
        pub persistent_keepalive: Option<u16>,
    }
    pub fn parse(_text: &str, _path: &Path) -> Result<Config, String> {
        Err("shim".into())
    }
}
pub mod control {
    #[derive(Debug, serde::Serialize, serde::Deserialize)]
    pub enum Request {
        Peers,
        Status,
        Reload,
    }
    #[derive(Debug, serde::Serialize, serde::Deserialize)]
    pub enum Response {
        Peers(Vec<String>),
        Status(String),
        Ok,
        Error(String),
    }
}
